//! Timer triggers, as the Functions host runs them: an NCRONTAB schedule
//! (`{second} {minute} {hour} {day} {month} {day-of-week}`, in UTC) and, at
//! each occurrence, `POST /{function}` to the handler with the timer's
//! payload. An occurrence that finds the handler down, or still busy with the
//! previous run, is skipped, as the real host's singleton lock would.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Result, anyhow, bail};
use chrono::{DateTime, Datelike, Duration as Span, Timelike, Utc};
use serde_json::{Value, json};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::Shared;

/// A parsed NCRONTAB expression: the allowed values of each field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Schedule {
    seconds: u64,
    minutes: u64,
    hours: u64,
    days: u64,
    months: u64,
    weekdays: u64,
    /// Both day fields were restricted: cron's rule is that either may match.
    days_or_weekdays: bool,
}

const MONTHS: [&str; 12] = ["jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec"];
const WEEKDAYS: [&str; 7] = ["sun", "mon", "tue", "wed", "thu", "fri", "sat"];

impl Schedule {
    pub fn parse(text: &str) -> Result<Schedule> {
        let fields: Vec<&str> = text.split_whitespace().collect();
        if fields.len() != 6 {
            bail!("schedule {text:?} has {} fields; NCRONTAB has six: second minute hour day month day-of-week", fields.len());
        }
        let field = |i: usize, name: &str, lo: u32, hi: u32, names: &[&str]| {
            parse_field(fields[i], lo, hi, names).map_err(|e| anyhow!("schedule {text:?}, {name}: {e}"))
        };
        let weekdays = field(5, "day-of-week", 0, 7, &WEEKDAYS)?;
        Ok(Schedule {
            seconds: field(0, "second", 0, 59, &[])?,
            minutes: field(1, "minute", 0, 59, &[])?,
            hours: field(2, "hour", 0, 23, &[])?,
            days: field(3, "day", 1, 31, &[])?,
            months: field(4, "month", 1, 12, &MONTHS)?,
            // 7 is Sunday too.
            weekdays: (weekdays | (weekdays >> 7)) & 0x7f,
            days_or_weekdays: fields[3] != "*" && fields[5] != "*",
        })
    }

    /// The first occurrence strictly after `after`, within five years.
    pub fn next_after(&self, after: DateTime<Utc>) -> Option<DateTime<Utc>> {
        let mut t = after.with_nanosecond(0)? + Span::seconds(1);
        let limit = after + Span::days(5 * 366);
        while t <= limit {
            if !has(self.months, t.month()) {
                let (y, m) = if t.month() == 12 { (t.year() + 1, 1) } else { (t.year(), t.month() + 1) };
                t = chrono::NaiveDate::from_ymd_opt(y, m, 1)?.and_hms_opt(0, 0, 0)?.and_utc();
            } else if !self.day_matches(t) {
                t = (t.date_naive() + Span::days(1)).and_hms_opt(0, 0, 0)?.and_utc();
            } else if !has(self.hours, t.hour()) {
                t = t.with_minute(0)?.with_second(0)? + Span::hours(1);
            } else if !has(self.minutes, t.minute()) {
                t = t.with_second(0)? + Span::minutes(1);
            } else if !has(self.seconds, t.second()) {
                t += Span::seconds(1);
            } else {
                return Some(t);
            }
        }
        None
    }

    fn day_matches(&self, t: DateTime<Utc>) -> bool {
        let day = has(self.days, t.day());
        let weekday = has(self.weekdays, t.weekday().num_days_from_sunday());
        if self.days_or_weekdays { day || weekday } else { day && weekday }
    }
}

fn has(set: u64, v: u32) -> bool {
    set & (1 << v) != 0
}

/// `*`, `5`, `1-5`, `*/15`, `10-50/10`, `mon-fri`, lists of these.
fn parse_field(text: &str, lo: u32, hi: u32, names: &[&str]) -> Result<u64> {
    let value = |s: &str| -> Result<u32> {
        let named = names.iter().position(|n| n.eq_ignore_ascii_case(s)).map(|i| i as u32 + if names.len() == 12 { 1 } else { 0 });
        let v = named.or_else(|| s.parse().ok()).ok_or_else(|| anyhow!("`{s}` is not a number"))?;
        if v < lo || v > hi {
            bail!("{v} is outside {lo}-{hi}");
        }
        Ok(v)
    };
    let mut set = 0u64;
    for part in text.split(',') {
        let (range, step) = match part.split_once('/') {
            Some((r, s)) => (r, s.parse::<u32>().ok().filter(|s| *s > 0).ok_or_else(|| anyhow!("step `{s}` is not a positive number"))?),
            None => (part, 1),
        };
        let (from, to) = match range {
            "*" => (lo, hi),
            r => match r.split_once('-') {
                Some((a, b)) => (value(a)?, value(b)?),
                None if step > 1 => (value(r)?, hi),
                None => (value(r)?, value(r)?),
            },
        };
        if from > to {
            bail!("range {from}-{to} runs backwards");
        }
        for v in (from..=to).step_by(step as usize) {
            set |= 1 << v;
        }
    }
    Ok(set)
}

/// One timer-triggered function.
#[derive(Debug, Clone)]
pub struct TimerSpec {
    pub function: String,
    pub binding: String,
    pub schedule: Schedule,
    pub run_on_startup: bool,
}

/// Runs every timer function on its schedule until `stop` turns true.
pub(crate) fn start(shared: Arc<Shared>, timers: Vec<TimerSpec>, stop: watch::Receiver<bool>) -> Vec<JoinHandle<()>> {
    timers.into_iter().map(|t| tokio::spawn(run(shared.clone(), t, stop.clone()))).collect()
}

async fn run(shared: Arc<Shared>, timer: TimerSpec, mut stop: watch::Receiver<bool>) {
    let mut last = None;
    if timer.run_on_startup {
        last = Some(fire(&shared, &timer, last, Utc::now()).await);
    }
    loop {
        let now = Utc::now();
        let Some(next) = timer.schedule.next_after(now) else {
            tracing::warn!(function = %timer.function, "the schedule has no next occurrence; the timer stops");
            return;
        };
        tokio::select! {
            _ = tokio::time::sleep((next - now).to_std().unwrap_or(Duration::ZERO)) => {}
            _ = stop.changed() => {}
        }
        if *stop.borrow() {
            return;
        }
        if shared.handler_ready() {
            last = Some(fire(&shared, &timer, last, next).await);
        }
    }
}

/// One occurrence, due at `due`: returns it, as the next one's `Last`.
async fn fire(shared: &Shared, timer: &TimerSpec, last: Option<DateTime<Utc>>, due: DateTime<Utc>) -> DateTime<Utc> {
    let next = timer.schedule.next_after(due).unwrap_or(due);
    // One occurrence runs on one instance only, as the host's singleton lock has it.
    let Some(target) = shared.pick() else {
        tracing::warn!(function = %timer.function, "no handler instance is ready; the occurrence is skipped");
        return due;
    };
    let mut request =
        shared.client.post(format!("{}/{}", target.counted(), timer.function)).json(&payload(timer, last, due, next));
    if let Some(t) = shared.config.function_timeout {
        request = request.timeout(t);
    }
    match request.send().await {
        Ok(r) if r.status().is_success() => {}
        Ok(r) => tracing::warn!(function = %timer.function, status = %r.status(), "timer invocation failed"),
        Err(e) => tracing::warn!(function = %timer.function, error = %e, "timer invocation failed"),
    }
    due
}

/// What the host sends a timer function: `Data.{binding}` is the TimerInfo.
fn payload(timer: &TimerSpec, last: Option<DateTime<Utc>>, due: DateTime<Utc>, next: DateTime<Utc>) -> Value {
    let at = |t: DateTime<Utc>| t.format("%Y-%m-%dT%H:%M:%S%.3fZ").to_string();
    let info = json!({
        "Schedule": { "AdjustForDST": false },
        "ScheduleStatus": { "Last": last.map(at), "Next": at(next), "LastUpdated": at(due) },
        "IsPastDue": Utc::now() - due > Span::seconds(5),
    });
    json!({
        "Data": { timer.binding.as_str(): info },
        "Metadata": { "sys": { "MethodName": timer.function, "UtcNow": at(Utc::now()), "RandGuid": uuid::Uuid::new_v4().to_string() } },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    #[test]
    fn every_thirty_seconds() {
        let s = Schedule::parse("*/30 * * * * *").unwrap();
        assert_eq!(s.next_after(at("2026-12-02T10:00:00Z")), Some(at("2026-12-02T10:00:30Z")));
        assert_eq!(s.next_after(at("2026-12-02T10:00:29.9Z")), Some(at("2026-12-02T10:00:30Z")));
        assert_eq!(s.next_after(at("2026-12-02T10:00:30Z")), Some(at("2026-12-02T10:01:00Z")));
    }

    #[test]
    fn ranges_lists_names_and_weekdays() {
        let s = Schedule::parse("0 30 9 * * mon-fri").unwrap();
        // 2026-12-05 is a Saturday.
        assert_eq!(s.next_after(at("2026-12-04T09:30:00Z")), Some(at("2026-12-07T09:30:00Z")));
        let s = Schedule::parse("0 0 0 1 jan,jul *").unwrap();
        assert_eq!(s.next_after(at("2026-12-02T00:00:00Z")), Some(at("2027-01-01T00:00:00Z")));
        let s = Schedule::parse("5 0-10/5 * * * 7").unwrap();
        assert_eq!(s.next_after(at("2026-12-05T23:59:00Z")), Some(at("2026-12-06T00:00:05Z")), "7 is Sunday");
        assert_eq!(s.next_after(at("2026-12-06T00:00:05Z")), Some(at("2026-12-06T00:05:05Z")));
    }

    #[test]
    fn bad_schedules_say_which_field() {
        assert!(Schedule::parse("* * * * *").unwrap_err().to_string().contains("six"));
        assert!(Schedule::parse("61 * * * * *").unwrap_err().to_string().contains("second"));
        assert!(Schedule::parse("* * * 0 * *").unwrap_err().to_string().contains("day"));
        assert!(Schedule::parse("*/0 * * * * *").unwrap_err().to_string().contains("step"));
        assert!(Schedule::parse("* * * * foo *").unwrap_err().to_string().contains("month"));
        assert_eq!(Schedule::parse("0 0 0 30 2 *").unwrap().next_after(at("2026-01-01T00:00:00Z")), None, "no 30 February");
    }
}
