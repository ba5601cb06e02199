//! Money is integer minor units plus an ISO 4217 currency. Never floats.

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// An ISO 4217 currency we can pay in, with its number of minor-unit digits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Currency {
    code: &'static str,
    exponent: u8,
}

/// The currencies ticketpay accepts, and their minor-unit exponents (ISO 4217).
const CURRENCIES: &[(&str, u8)] = &[
    ("AUD", 2), ("BHD", 3), ("BRL", 2), ("CAD", 2), ("CHF", 2), ("CLP", 0), ("CNY", 2),
    ("COP", 2), ("CZK", 2), ("DKK", 2), ("EUR", 2), ("GBP", 2), ("HKD", 2), ("HUF", 2),
    ("IDR", 2), ("ILS", 2), ("INR", 2), ("ISK", 0), ("JOD", 3), ("JPY", 0), ("KRW", 0),
    ("KWD", 3), ("MXN", 2), ("NOK", 2), ("NZD", 2), ("OMR", 3), ("PEN", 2), ("PHP", 2),
    ("PLN", 2), ("RON", 2), ("SAR", 2), ("SEK", 2), ("SGD", 2), ("THB", 2), ("TND", 3),
    ("TRY", 2), ("USD", 2), ("UYU", 2), ("ZAR", 2),
];

impl Currency {
    pub fn parse(code: &str) -> Result<Currency, String> {
        CURRENCIES
            .iter()
            .find(|(c, _)| *c == code)
            .map(|&(code, exponent)| Currency { code, exponent })
            .ok_or_else(|| format!("`{code}` is not a supported ISO 4217 currency code"))
    }

    pub fn code(self) -> &'static str {
        self.code
    }

    pub fn exponent(self) -> u8 {
        self.exponent
    }
}

impl fmt::Display for Currency {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.code)
    }
}

impl Serialize for Currency {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.code)
    }
}

impl<'de> Deserialize<'de> for Currency {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let code = String::deserialize(d)?;
        Currency::parse(&code).map_err(serde::de::Error::custom)
    }
}

/// An amount offered where another currency is kept: a defect of the caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("an amount in {found} where amounts are in {expected}")]
pub struct WrongCurrency {
    pub expected: Currency,
    pub found: Currency,
}

/// An amount in minor units of one currency.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Money {
    pub minor: i64,
    pub currency: Currency,
}

impl Money {
    pub fn new(minor: i64, currency: Currency) -> Money {
        Money { minor, currency }
    }

    pub fn is_zero(self) -> bool {
        self.minor == 0
    }

    /// Parses a non-negative decimal string such as `"1250.50"` in the currency's
    /// precision. A sign, an exponent, more fraction digits than the currency has,
    /// or an amount beyond `i64` minor units is an error.
    pub fn parse_decimal(text: &str, currency: Currency) -> Result<Money, String> {
        let text = text.trim();
        if text.starts_with('-') {
            return Err(format!("`{text}` is negative"));
        }
        let (whole, fraction) = match text.split_once('.') {
            Some((w, f)) => (w, f),
            None => (text, ""),
        };
        let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
        if !digits(whole) || (text.contains('.') && !digits(fraction)) {
            return Err(format!("`{text}` is not a decimal amount like 1250.50"));
        }
        let exponent = usize::from(currency.exponent);
        if fraction.len() > exponent {
            return Err(format!(
                "`{text}` has more than {exponent} decimal places, the precision of {currency}"
            ));
        }
        let padded = format!("{whole}{fraction:0<exponent$}");
        let minor = padded
            .parse::<i64>()
            .map_err(|_| format!("`{text}` is too large"))?;
        Ok(Money { minor, currency })
    }

    /// The amount as a decimal string in the currency's precision, e.g. `"1250.50"`.
    pub fn to_decimal(self) -> String {
        format_minor(self.minor, self.currency)
    }
}

/// What an issuing authority says a ticket owes, as the pipeline reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Due {
    /// This much, in the batch's currency; more than nothing.
    Owed(Money),
    Nothing,
    /// An answer that cannot be paid as it stands: why.
    Unpayable(String),
}

impl Due {
    /// Reads an authority's answer for a batch paying in `pays_in`: an amount in
    /// another currency, or below zero, is no amount to pay.
    pub fn read(nothing_due: bool, minor: i64, currency: &str, pays_in: Currency) -> Due {
        if nothing_due || minor == 0 {
            Due::Nothing
        } else if currency != pays_in.code() {
            Due::Unpayable(format!("the authority asks for {currency}, the batch pays in {pays_in}"))
        } else if minor < 0 {
            Due::Unpayable(format!("the authority answered a negative amount ({minor})"))
        } else {
            Due::Owed(Money::new(minor, pays_in))
        }
    }
}

/// Formats minor units as a decimal string in the currency's precision.
pub fn format_minor(minor: i64, currency: Currency) -> String {
    let exponent = u32::from(currency.exponent);
    if exponent == 0 {
        return minor.to_string();
    }
    let scale = 10_i64.pow(exponent);
    let sign = if minor < 0 { "-" } else { "" };
    let abs = minor.unsigned_abs();
    let scale = scale.unsigned_abs();
    format!("{sign}{}.{:0width$}", abs / scale, abs % scale, width = exponent as usize)
}

impl fmt::Display for Money {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.to_decimal(), self.currency)
    }
}

impl std::str::FromStr for Money {
    type Err = String;
    /// Reads what [`Money`]'s `Display` writes: `"1250.50 EUR"`.
    fn from_str(text: &str) -> Result<Money, String> {
        let (amount, code) = text.rsplit_once(' ').ok_or_else(|| format!("`{text}` is not an amount and a currency like 1250.50 EUR"))?;
        let currency = Currency::parse(code)?;
        let negative = amount.starts_with('-');
        let money = Money::parse_decimal(amount.trim_start_matches('-'), currency)?;
        Ok(if negative { Money::new(-money.minor, currency) } else { money })
    }
}

/// Money as text, `"1250.50 EUR"`, for records people read: `#[serde(with = "money::text")]`.
pub mod text {
    use serde::{Deserialize, Deserializer, Serializer};

    use super::Money;

    pub fn serialize<S: Serializer>(money: &Money, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(money)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Money, D::Error> {
        String::deserialize(d)?.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_authoritys_answer_is_owed_only_in_the_batchs_currency_and_above_zero() {
        let eur = Currency::parse("EUR").unwrap();
        assert_eq!(Due::read(false, 1250, "EUR", eur), Due::Owed(Money::new(1250, eur)));
        assert_eq!(Due::read(true, 1250, "EUR", eur), Due::Nothing);
        assert_eq!(Due::read(false, 0, "EUR", eur), Due::Nothing);
        assert_eq!(Due::read(false, 1250, "USD", eur), Due::Unpayable("the authority asks for USD, the batch pays in EUR".into()));
        assert_eq!(Due::read(false, -5, "EUR", eur), Due::Unpayable("the authority answered a negative amount (-5)".into()));
    }

    fn eur() -> Currency {
        Currency::parse("EUR").unwrap()
    }

    #[test]
    fn parses_decimal_amounts_in_the_currency_precision() {
        assert_eq!(Money::parse_decimal("1250.50", eur()).unwrap().minor, 125_050);
        assert_eq!(Money::parse_decimal("1250.5", eur()).unwrap().minor, 125_050);
        assert_eq!(Money::parse_decimal("7", eur()).unwrap().minor, 700);
        assert_eq!(Money::parse_decimal("0.01", eur()).unwrap().minor, 1);
        let jpy = Currency::parse("JPY").unwrap();
        assert_eq!(Money::parse_decimal("1500", jpy).unwrap().minor, 1500);
        let kwd = Currency::parse("KWD").unwrap();
        assert_eq!(Money::parse_decimal("1.234", kwd).unwrap().minor, 1234);
    }

    #[test]
    fn rejects_negative_over_precise_and_malformed_amounts() {
        for bad in ["-1", "1.234", "abc", "", "1e5", "1.", ".5", "1,5", "+3", "99999999999999999999"] {
            assert!(Money::parse_decimal(bad, eur()).is_err(), "{bad} should be rejected");
        }
        assert!(Money::parse_decimal("10.5", Currency::parse("JPY").unwrap()).is_err());
    }

    #[test]
    fn formats_back_to_the_same_decimal() {
        for text in ["0.00", "0.07", "1250.50", "92233720368547758.07"] {
            assert_eq!(Money::parse_decimal(text, eur()).unwrap().to_decimal(), text);
        }
        assert_eq!(format_minor(-5, eur()), "-0.05");
        assert_eq!(format_minor(42, Currency::parse("JPY").unwrap()), "42");
    }

    #[test]
    fn unknown_currencies_are_named() {
        let err = Currency::parse("EURO").unwrap_err();
        assert!(err.contains("EURO"));
        assert!(Currency::parse("eur").is_err());
    }
}
