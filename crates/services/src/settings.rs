//! One typed `Settings`, read from the environment (contract section 1) and validated
//! at start: a bad value stops the program with a message naming the setting.
use std::time::Duration;

pub const DEFAULT_DATABASE_URL: &str = "postgres://postgres@127.0.0.1:5432/orderflow";
pub const DEFAULT_AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

#[derive(Clone, PartialEq)]
pub struct Settings {
    pub database_url: String,
    pub amqp_url: String,
    pub review_threshold_cents: i64,
    pub payment_timeout: Duration,
    pub review_timeout: Duration,
    pub delivery_delay: Duration,
    pub express_delivery_delay: Duration,
    pub gateway_latency: Duration,
    pub gateway_failure_rate: f64,
    pub currency: String,
}

impl std::fmt::Debug for Settings {
    // URLs may carry passwords: print them redacted.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Settings")
            .field("database_url", &redact_url(&self.database_url))
            .field("amqp_url", &redact_url(&self.amqp_url))
            .field("review_threshold_cents", &self.review_threshold_cents)
            .field("payment_timeout", &self.payment_timeout)
            .field("review_timeout", &self.review_timeout)
            .field("delivery_delay", &self.delivery_delay)
            .field("express_delivery_delay", &self.express_delivery_delay)
            .field("gateway_latency", &self.gateway_latency)
            .field("gateway_failure_rate", &self.gateway_failure_rate)
            .field("currency", &self.currency)
            .finish()
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid setting {name}={value:?}: {reason}")]
pub struct SettingsError {
    pub name: &'static str,
    pub value: String,
    pub reason: String,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            database_url: DEFAULT_DATABASE_URL.to_owned(),
            amqp_url: DEFAULT_AMQP_URL.to_owned(),
            review_threshold_cents: 100_000,
            payment_timeout: Duration::from_secs(30),
            review_timeout: Duration::from_secs(24 * 3600),
            delivery_delay: Duration::from_secs(2),
            express_delivery_delay: Duration::from_millis(500),
            gateway_latency: Duration::ZERO,
            gateway_failure_rate: 0.0,
            currency: "EUR".to_owned(),
        }
    }
}

impl Settings {
    /// Reads the process environment.
    pub fn from_env() -> Result<Settings, SettingsError> {
        Settings::from_lookup(|name| std::env::var(name).ok())
    }

    /// Reads settings through `lookup` (the environment, or a map in tests).
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Settings, SettingsError> {
        let defaults = Settings::default();
        let get = |name: &'static str| {
            lookup(name)
                .filter(|v| !v.trim().is_empty())
                .map(|v| (name, v))
        };
        Ok(Settings {
            database_url: get("DATABASE_URL").map_or(defaults.database_url, |(_, v)| v),
            amqp_url: get("AMQP_URL").map_or(defaults.amqp_url, |(_, v)| v),
            review_threshold_cents: get("ORDERFLOW_REVIEW_THRESHOLD_CENTS")
                .map_or(Ok(defaults.review_threshold_cents), parse_cents)?,
            payment_timeout: get("ORDERFLOW_PAYMENT_TIMEOUT")
                .map_or(Ok(defaults.payment_timeout), parse_duration)?,
            review_timeout: get("ORDERFLOW_REVIEW_TIMEOUT")
                .map_or(Ok(defaults.review_timeout), parse_duration)?,
            delivery_delay: get("ORDERFLOW_DELIVERY_DELAY")
                .map_or(Ok(defaults.delivery_delay), parse_duration)?,
            express_delivery_delay: get("ORDERFLOW_EXPRESS_DELIVERY_DELAY")
                .map_or(Ok(defaults.express_delivery_delay), parse_duration)?,
            gateway_latency: get("ORDERFLOW_GATEWAY_LATENCY")
                .map_or(Ok(defaults.gateway_latency), parse_duration)?,
            gateway_failure_rate: get("ORDERFLOW_GATEWAY_FAILURE_RATE")
                .map_or(Ok(defaults.gateway_failure_rate), parse_rate)?,
            currency: get("ORDERFLOW_CURRENCY").map_or(Ok(defaults.currency), parse_currency)?,
        })
    }
}

fn invalid(name: &'static str, value: &str, reason: impl Into<String>) -> SettingsError {
    SettingsError {
        name,
        value: value.to_owned(),
        reason: reason.into(),
    }
}

fn parse_duration((name, value): (&'static str, String)) -> Result<Duration, SettingsError> {
    humantime::parse_duration(value.trim()).map_err(|e| {
        invalid(
            name,
            &value,
            format!("{e} (write durations like 0s, 500ms, 30s, 5m, 24h)"),
        )
    })
}

fn parse_cents((name, value): (&'static str, String)) -> Result<i64, SettingsError> {
    match value.trim().parse::<i64>() {
        Ok(cents) if cents >= 0 => Ok(cents),
        Ok(_) => Err(invalid(name, &value, "must not be negative")),
        Err(e) => Err(invalid(
            name,
            &value,
            format!("{e} (an integer amount in cents)"),
        )),
    }
}

fn parse_rate((name, value): (&'static str, String)) -> Result<f64, SettingsError> {
    match value.trim().parse::<f64>() {
        Ok(rate) if (0.0..=1.0).contains(&rate) => Ok(rate),
        Ok(_) => Err(invalid(name, &value, "must be between 0.0 and 1.0")),
        Err(e) => Err(invalid(name, &value, e.to_string())),
    }
}

fn parse_currency((name, value): (&'static str, String)) -> Result<String, SettingsError> {
    let code = value.trim();
    if code.len() == 3 && code.chars().all(|c| c.is_ascii_uppercase()) {
        Ok(code.to_owned())
    } else {
        Err(invalid(
            name,
            &value,
            "must be a three-letter upper-case currency code such as EUR",
        ))
    }
}

/// `scheme://user:secret@host/…` → `scheme://user:***@host/…`, for logs and errors.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let (authority, path) = rest
        .split_once('/')
        .map_or((rest, None), |(a, p)| (a, Some(p)));
    let Some((userinfo, host)) = authority.rsplit_once('@') else {
        return url.to_owned();
    };
    let user = userinfo.split_once(':').map_or(userinfo, |(u, _)| u);
    let masked = if userinfo.contains(':') {
        format!("{user}:***")
    } else {
        user.to_owned()
    };
    match path {
        Some(p) => format!("{scheme}://{masked}@{host}/{p}"),
        None => format!("{scheme}://{masked}@{host}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn with(vars: &[(&str, &str)]) -> Result<Settings, SettingsError> {
        let map: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Settings::from_lookup(|k| map.get(k).cloned())
    }

    #[test]
    fn defaults_are_the_contracts() {
        let s = with(&[]).expect("defaults are valid");
        assert_eq!(s, Settings::default());
        assert_eq!(s.payment_timeout, Duration::from_secs(30));
        assert_eq!(s.express_delivery_delay, Duration::from_millis(500));
    }

    #[test]
    fn durations_parse_as_the_contract_writes_them() {
        let s = with(&[
            ("ORDERFLOW_PAYMENT_TIMEOUT", "0s"),
            ("ORDERFLOW_REVIEW_TIMEOUT", "5m"),
            ("ORDERFLOW_DELIVERY_DELAY", "500ms"),
            ("ORDERFLOW_EXPRESS_DELIVERY_DELAY", "24h"),
        ])
        .expect("valid durations");
        assert_eq!(s.payment_timeout, Duration::ZERO);
        assert_eq!(s.review_timeout, Duration::from_secs(300));
        assert_eq!(s.delivery_delay, Duration::from_millis(500));
        assert_eq!(s.express_delivery_delay, Duration::from_secs(86_400));
    }

    #[test]
    fn a_bad_setting_is_named_in_the_error() {
        let err = with(&[("ORDERFLOW_PAYMENT_TIMEOUT", "soon")]).expect_err("invalid");
        assert_eq!(err.name, "ORDERFLOW_PAYMENT_TIMEOUT");
        assert!(err.to_string().contains("ORDERFLOW_PAYMENT_TIMEOUT"));
        assert_eq!(
            with(&[("ORDERFLOW_GATEWAY_FAILURE_RATE", "1.5")]).map_err(|e| e.name),
            Err("ORDERFLOW_GATEWAY_FAILURE_RATE")
        );
        assert_eq!(
            with(&[("ORDERFLOW_REVIEW_THRESHOLD_CENTS", "12.5")]).map_err(|e| e.name),
            Err("ORDERFLOW_REVIEW_THRESHOLD_CENTS")
        );
        assert_eq!(
            with(&[("ORDERFLOW_CURRENCY", "euro")]).map_err(|e| e.name),
            Err("ORDERFLOW_CURRENCY")
        );
    }

    #[test]
    fn passwords_never_print() {
        assert_eq!(
            redact_url("amqp://guest:guest@127.0.0.1:5672/%2f"),
            "amqp://guest:***@127.0.0.1:5672/%2f"
        );
        assert_eq!(
            redact_url("postgres://postgres@127.0.0.1/db"),
            "postgres://postgres@127.0.0.1/db"
        );
        let s = with(&[("DATABASE_URL", "postgres://u:hunter2@h/db")]).expect("valid");
        assert!(!format!("{s:?}").contains("hunter2"));
    }
}
