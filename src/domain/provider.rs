//! Who the providers are: the nine roles a ticket meets on its way.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// The nine provider roles a ticket meets on its way through the pipeline.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ProviderName {
    /// The issuing authority: tells the amount due, one ticket per request.
    Authority,
    Registry,
    Fraud,
    Sanctions,
    /// Captures the funds.
    Gateway,
    /// Settles the ticket with the authority.
    Settlement,
    Ledger,
    /// Issues the fiscal receipt.
    Receipt,
    /// Tells the client.
    Notifier,
}

impl ProviderName {
    pub const ALL: [ProviderName; 9] = [
        Self::Authority,
        Self::Registry,
        Self::Fraud,
        Self::Sanctions,
        Self::Gateway,
        Self::Settlement,
        Self::Ledger,
        Self::Receipt,
        Self::Notifier,
    ];
    pub const VALIDATORS: [ProviderName; 3] = [Self::Registry, Self::Fraud, Self::Sanctions];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Authority => "authority",
            Self::Registry => "registry",
            Self::Fraud => "fraud",
            Self::Sanctions => "sanctions",
            Self::Gateway => "gateway",
            Self::Settlement => "settlement",
            Self::Ledger => "ledger",
            Self::Receipt => "receipt",
            Self::Notifier => "notifier",
        }
    }

    /// Providers whose operations move money; a repeated operation there is a double charge.
    pub fn takes_money(self) -> bool {
        matches!(self, Self::Gateway | Self::Settlement)
    }
}

impl fmt::Display for ProviderName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for ProviderName {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|p| p.as_str() == s)
            .ok_or_else(|| format!("unknown provider `{s}`"))
    }
}
