//! The console: a status page for people at `/api/console`. The handler serves
//! one data-free page (and its script and style) for every console address; the
//! script routes on the path and reads everything from the JSON API, sending the
//! key it was given (`?code=` or the key field) as `x-functions-key`.

use std::sync::{Arc, LazyLock};

use axum::Router;
use axum::http::header;
use axum::response::IntoResponse;

use super::App;
use crate::domain::Status;

/// The page, naming the statuses for the script: they are the domain's, not a copy.
static PAGE: LazyLock<String> = LazyLock::new(|| {
    let names = |statuses: &mut dyn Iterator<Item = &'static str>| statuses.collect::<Vec<_>>().join(" ");
    include_str!("console.html")
        .replace("{{statuses}}", &names(&mut Status::ALL.into_iter().map(Status::as_str)))
        .replace("{{end_states}}", &names(&mut Status::END_NAMES.into_iter()))
});
const SCRIPT: &str = include_str!("console.js");
const STYLE: &str = include_str!("console.css");

/// Nothing but this origin's own script, style and API; no framing; the key in
/// a `?code=` link never leaves in a Referer.
const POLICY: &str = "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self'; \
                      base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

super::route_table! { ROUTES, routes:
    "/api/console" => get(page);
    "/api/console/" => get(page);
    "/api/console/batches/{batch_id}" => get(page);
    "/api/console/batches/{batch_id}/attention" => get(page);
    "/api/console/batches/{batch_id}/tickets/{ticket_id}" => get(page);
    "/api/console/console.js" => get(script);
    "/api/console/console.css" => get(style);
}

pub fn router() -> Router<Arc<App>> {
    routes()
}

async fn page() -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CONTENT_SECURITY_POLICY, POLICY),
            (header::REFERRER_POLICY, "no-referrer"),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        PAGE.as_str(),
    )
}

async fn script() -> impl IntoResponse {
    asset("text/javascript; charset=utf-8", SCRIPT)
}

async fn style() -> impl IntoResponse {
    asset("text/css; charset=utf-8", STYLE)
}

fn asset(content_type: &'static str, body: &'static str) -> impl IntoResponse {
    ([(header::CONTENT_TYPE, content_type), (header::X_CONTENT_TYPE_OPTIONS, "nosniff"), (header::CACHE_CONTROL, "no-cache")], body)
}

#[cfg(test)]
mod tests {
    use crate::domain::Status;

    #[test]
    fn the_page_names_every_status_and_the_style_colours_every_end() {
        let meta = |name: &str| {
            let tag = format!("<meta name=\"{name}\" content=\"");
            let rest = &super::PAGE[super::PAGE.find(&tag).expect(name) + tag.len()..];
            rest[..rest.find('"').unwrap()].split(' ').map(str::to_owned).collect::<Vec<_>>()
        };
        assert_eq!(meta("statuses"), Status::ALL.map(|s| s.as_str().to_owned()));
        assert_eq!(meta("end-states"), Status::END_NAMES);
        for state in Status::END_NAMES {
            assert!(super::STYLE.contains(&format!(".s-{state}")), "console.css colours {state}");
        }
    }
}
