//! One typed `Settings`: defaults → the optional TOML file named by `ORDERFLOW_CONFIG`
//! → the environment (contract section 1), validated at start: a bad value stops the
//! program with a message naming the setting.
//!
//! The file uses the settings' names in lower case, without the `ORDERFLOW_` prefix:
//!
//! ```toml
//! review_threshold_cents = 50000
//! payment_timeout = "10s"
//! workflow_version = 2
//! fraud_max_orders_per_minute = 5
//! ```
//!
//! A variable set in the environment overrides the same setting in the file. An
//! unknown key in the file is an error (a typo must not silently leave a rule off).
use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use domain::rules::{WORKFLOW_VERSION, WORKFLOW_VERSIONS};

pub const DEFAULT_DATABASE_URL: &str = "postgres://postgres@127.0.0.1:5432/orderflow";
pub const DEFAULT_AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
/// Where `orderflow run` serves `/metrics`, `/healthz` and `/readyz` by default.
pub const DEFAULT_HTTP_ADDR: &str = "127.0.0.1:9464";

/// Where `orderflow run` serves HTTP (`ORDERFLOW_HTTP_ADDR`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HttpAddr {
    /// `off`: no HTTP endpoint.
    Off,
    /// Nothing configured: the default address. When it is taken (another process on
    /// the machine has it) the process runs on without the endpoint, with a warning.
    Default(SocketAddr),
    /// Configured: failing to listen there stops the process. Port 0 picks a free
    /// port (logged).
    Set(SocketAddr),
}

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
    /// The workflow version new orders start under (`ORDERFLOW_WORKFLOW_VERSION`).
    pub workflow_version: u32,
    /// Fraud rule, workflow 2: more orders than this per customer within a minute
    /// go to review (`ORDERFLOW_FRAUD_MAX_ORDERS_PER_MINUTE`; unset: off).
    pub fraud_max_orders_per_minute: Option<u32>,
    /// Express eligibility: express orders of more units ship with the standard delay
    /// (`ORDERFLOW_EXPRESS_MAX_UNITS`; unset: off).
    pub express_max_units: Option<u32>,
    /// `/metrics`, `/healthz`, `/readyz` (`ORDERFLOW_HTTP_ADDR`).
    pub http_addr: HttpAddr,
    /// How often a running process refreshes its row in `workers`
    /// (`ORDERFLOW_HEARTBEAT_INTERVAL`); silent for three of them = gone.
    pub heartbeat_interval: Duration,
    /// Database connections in this process's pool (`ORDERFLOW_DB_POOL_SIZE`; unset:
    /// 4 + 4 per worker, at most 16), to keep the sum over all processes under
    /// PostgreSQL's `max_connections`.
    pub db_pool_size: Option<u32>,
    /// Grouped appends in flight at once (`ORDERFLOW_APPEND_SLOTS`; default 8, 0 turns
    /// grouping off): single-stream appends made while every slot is busy are written
    /// together, one statement and one transaction (`EventStore::with_group_commit`).
    /// With 8 slots appends group only under load, where it saves a third of the
    /// commits and shortens the tail (docs/OPERATIONS.md).
    pub append_slots: usize,
}

/// Grouped appends in flight at once unless set (`ORDERFLOW_APPEND_SLOTS`). Each slot
/// is a pooled connection while its statement runs. 8 on 4 Dec, when 4 made appends at
/// half load queue for a slot (pools of 24 then, commands forwarded through the
/// broker); 4 since 5 Dec, with pools of at most 16 and commands handed over in
/// process (all workers in one process, 0.5 scale, A B A B: bursts 545, 545, 552, 549
/// → 570, 552, 570, 564 orders/s with 4; at 270 orders/s p50 to the final status
/// 38–40 → 32–36 ms, p99 73 and 246 → 57 and 61 ms).
pub const DEFAULT_APPEND_SLOTS: usize = 4;

/// The variable naming the optional settings file.
pub const CONFIG_FILE_VAR: &str = "ORDERFLOW_CONFIG";

/// Every setting: its key in the settings file and its environment variable.
pub const SETTINGS: [(&str, &str); 17] = [
    ("database_url", "DATABASE_URL"),
    ("amqp_url", "AMQP_URL"),
    ("review_threshold_cents", "ORDERFLOW_REVIEW_THRESHOLD_CENTS"),
    ("payment_timeout", "ORDERFLOW_PAYMENT_TIMEOUT"),
    ("review_timeout", "ORDERFLOW_REVIEW_TIMEOUT"),
    ("delivery_delay", "ORDERFLOW_DELIVERY_DELAY"),
    ("express_delivery_delay", "ORDERFLOW_EXPRESS_DELIVERY_DELAY"),
    ("gateway_latency", "ORDERFLOW_GATEWAY_LATENCY"),
    ("gateway_failure_rate", "ORDERFLOW_GATEWAY_FAILURE_RATE"),
    ("currency", "ORDERFLOW_CURRENCY"),
    ("workflow_version", "ORDERFLOW_WORKFLOW_VERSION"),
    (
        "fraud_max_orders_per_minute",
        "ORDERFLOW_FRAUD_MAX_ORDERS_PER_MINUTE",
    ),
    ("express_max_units", "ORDERFLOW_EXPRESS_MAX_UNITS"),
    ("http_addr", "ORDERFLOW_HTTP_ADDR"),
    ("heartbeat_interval", "ORDERFLOW_HEARTBEAT_INTERVAL"),
    ("db_pool_size", "ORDERFLOW_DB_POOL_SIZE"),
    ("append_slots", "ORDERFLOW_APPEND_SLOTS"),
];

/// The settings file, parsed: values by environment-variable name.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ConfigFile {
    pub path: String,
    values: HashMap<&'static str, String>,
}

impl ConfigFile {
    /// Reads and parses the file at `path`.
    pub fn read(path: &str) -> Result<ConfigFile, SettingsError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| invalid(CONFIG_FILE_VAR, path, format!("cannot read the file: {e}")))?;
        ConfigFile::parse(path, &text)
    }

    /// Parses settings-file text (`path` only names it in errors).
    pub fn parse(path: &str, text: &str) -> Result<ConfigFile, SettingsError> {
        let table: toml::Table = toml::from_str(text)
            .map_err(|e| invalid(CONFIG_FILE_VAR, path, format!("not valid TOML: {e}")))?;
        let mut values = HashMap::new();
        for (key, value) in table {
            let env_name = SETTINGS
                .iter()
                .find(|(k, _)| *k == key)
                .map(|(_, env)| *env)
                .ok_or_else(|| {
                    invalid(
                        CONFIG_FILE_VAR,
                        path,
                        format!("unknown setting '{key}' in the file"),
                    )
                })?;
            let text = match value {
                toml::Value::String(s) => s,
                toml::Value::Integer(i) => i.to_string(),
                toml::Value::Float(f) => f.to_string(),
                other => {
                    return Err(invalid(
                        env_name,
                        &format!("{other:?}"),
                        format!("in {path}: write a string or a number"),
                    ))
                }
            };
            values.insert(env_name, text);
        }
        Ok(ConfigFile {
            path: path.to_owned(),
            values,
        })
    }

    /// The file's value of a setting, by environment-variable name.
    pub fn get(&self, env_name: &str) -> Option<String> {
        self.values.get(env_name).cloned()
    }
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
            .field("workflow_version", &self.workflow_version)
            .field(
                "fraud_max_orders_per_minute",
                &self.fraud_max_orders_per_minute,
            )
            .field("express_max_units", &self.express_max_units)
            .field("http_addr", &self.http_addr)
            .field("heartbeat_interval", &self.heartbeat_interval)
            .field("db_pool_size", &self.db_pool_size)
            .field("append_slots", &self.append_slots)
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
            workflow_version: WORKFLOW_VERSION,
            fraud_max_orders_per_minute: None,
            express_max_units: None,
            http_addr: HttpAddr::Default(SocketAddr::from(([127, 0, 0, 1], 9464))),
            heartbeat_interval: Duration::from_secs(5),
            db_pool_size: None,
            append_slots: DEFAULT_APPEND_SLOTS,
        }
    }
}

impl Settings {
    /// Reads the settings file named by `ORDERFLOW_CONFIG`, if any, and the process
    /// environment, which overrides it.
    pub fn from_env() -> Result<Settings, SettingsError> {
        let env = |name: &str| std::env::var(name).ok();
        let file = match env(CONFIG_FILE_VAR).filter(|p| !p.trim().is_empty()) {
            Some(path) => Some(ConfigFile::read(path.trim())?),
            None => None,
        };
        Settings::layered(env, file.as_ref())
    }

    /// The environment (`env`) over the settings file over the defaults.
    pub fn layered(
        env: impl Fn(&str) -> Option<String>,
        file: Option<&ConfigFile>,
    ) -> Result<Settings, SettingsError> {
        Settings::from_lookup(|name| {
            env(name)
                .filter(|v| !v.trim().is_empty())
                .or_else(|| file.and_then(|f| f.get(name)))
        })
    }

    /// Reads settings through `lookup` (the environment, or a map in tests).
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Settings, SettingsError> {
        let defaults = Settings::default();
        let get = |name: &'static str| {
            lookup(name)
                .filter(|v| !v.trim().is_empty())
                .map(|v| (name, v))
        };
        Settings {
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
            workflow_version: get("ORDERFLOW_WORKFLOW_VERSION")
                .map_or(Ok(defaults.workflow_version), parse_workflow_version)?,
            fraud_max_orders_per_minute: get("ORDERFLOW_FRAUD_MAX_ORDERS_PER_MINUTE")
                .map(parse_orders_per_minute)
                .transpose()?,
            express_max_units: get("ORDERFLOW_EXPRESS_MAX_UNITS")
                .map(parse_units)
                .transpose()?,
            http_addr: get("ORDERFLOW_HTTP_ADDR")
                .map_or(Ok(defaults.http_addr), parse_http_addr)?,
            heartbeat_interval: get("ORDERFLOW_HEARTBEAT_INTERVAL")
                .map_or(Ok(defaults.heartbeat_interval), parse_duration)?,
            db_pool_size: get("ORDERFLOW_DB_POOL_SIZE")
                .map(parse_pool_size)
                .transpose()?,
            append_slots: get("ORDERFLOW_APPEND_SLOTS")
                .map_or(Ok(defaults.append_slots), parse_append_slots)?,
        }
        .consistent()
    }

    /// Checks settings that only make sense together.
    fn consistent(self) -> Result<Settings, SettingsError> {
        if self.heartbeat_interval.is_zero() {
            return Err(invalid(
                "ORDERFLOW_HEARTBEAT_INTERVAL",
                "0s",
                "must be longer than zero",
            ));
        }
        if let (Some(max), 1) = (self.fraud_max_orders_per_minute, self.workflow_version) {
            return Err(invalid(
                "ORDERFLOW_FRAUD_MAX_ORDERS_PER_MINUTE",
                &max.to_string(),
                "fraud checks run from workflow version 2 on: set ORDERFLOW_WORKFLOW_VERSION=2 too",
            ));
        }
        Ok(self)
    }
}

fn parse_workflow_version((name, value): (&'static str, String)) -> Result<u32, SettingsError> {
    match value.trim().parse::<u32>() {
        Ok(v) if WORKFLOW_VERSIONS.contains(&v) => Ok(v),
        _ => Err(invalid(
            name,
            &value,
            format!("must be one of the workflow versions {WORKFLOW_VERSIONS:?}"),
        )),
    }
}

fn parse_orders_per_minute((name, value): (&'static str, String)) -> Result<u32, SettingsError> {
    match value.trim().parse::<u32>() {
        Ok(n) if n >= 1 => Ok(n),
        Ok(_) => Err(invalid(
            name,
            &value,
            "must be at least 1 (leave it unset to turn the rule off)",
        )),
        Err(e) => Err(invalid(
            name,
            &value,
            format!("{e} (a whole number of orders)"),
        )),
    }
}

fn parse_units((name, value): (&'static str, String)) -> Result<u32, SettingsError> {
    match value.trim().parse::<u32>() {
        Ok(n) if n >= 1 => Ok(n),
        _ => Err(invalid(
            name,
            &value,
            "must be a whole number of units, at least 1 (leave it unset to turn the rule off)",
        )),
    }
}

fn parse_pool_size((name, value): (&'static str, String)) -> Result<u32, SettingsError> {
    match value.trim().parse::<u32>() {
        // A handler may hold a transaction while its worker reads another stream.
        Ok(n) if n >= 2 => Ok(n),
        _ => Err(invalid(
            name,
            &value,
            "must be a whole number of connections, at least 2 (leave it unset for 4 + 4 per worker, at most 16)",
        )),
    }
}

fn parse_append_slots((name, value): (&'static str, String)) -> Result<usize, SettingsError> {
    match value.trim().parse::<usize>() {
        Ok(n) if n <= 64 => Ok(n),
        _ => Err(invalid(
            name,
            &value,
            "must be a whole number of slots from 0 (no grouping) to 64",
        )),
    }
}

fn parse_http_addr((name, value): (&'static str, String)) -> Result<HttpAddr, SettingsError> {
    let text = value.trim();
    if text.eq_ignore_ascii_case("off") {
        return Ok(HttpAddr::Off);
    }
    text.parse::<SocketAddr>().map(HttpAddr::Set).map_err(|e| {
        invalid(
            name,
            &value,
            format!("{e} (write host:port such as {DEFAULT_HTTP_ADDR}, port 0 for any free port, or off)"),
        )
    })
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
    fn append_slots_default_to_four_and_can_be_set_or_turned_off() {
        assert_eq!(with(&[]).map(|s| s.append_slots), Ok(4));
        assert_eq!(
            with(&[("ORDERFLOW_APPEND_SLOTS", "8")]).map(|s| s.append_slots),
            Ok(8)
        );
        assert_eq!(
            with(&[("ORDERFLOW_APPEND_SLOTS", "0")]).map(|s| s.append_slots),
            Ok(0)
        );
        for bad in ["-1", "65", "some"] {
            assert_eq!(
                with(&[("ORDERFLOW_APPEND_SLOTS", bad)]).map_err(|e| e.name),
                Err("ORDERFLOW_APPEND_SLOTS"),
                "{bad}"
            );
        }
    }

    #[test]
    fn the_pool_size_is_chosen_per_process_or_set() {
        assert_eq!(with(&[]).map(|s| s.db_pool_size), Ok(None));
        assert_eq!(
            with(&[("ORDERFLOW_DB_POOL_SIZE", "8")]).map(|s| s.db_pool_size),
            Ok(Some(8))
        );
        for bad in ["1", "0", "-3", "many"] {
            assert_eq!(
                with(&[("ORDERFLOW_DB_POOL_SIZE", bad)]).map_err(|e| e.name),
                Err("ORDERFLOW_DB_POOL_SIZE"),
                "{bad}"
            );
        }
    }

    #[test]
    fn workflow_version_and_fraud_rule_default_to_1_and_off() {
        let s = with(&[]).expect("defaults are valid");
        assert_eq!(
            (s.workflow_version, s.fraud_max_orders_per_minute),
            (1, None)
        );
        let s = with(&[
            ("ORDERFLOW_WORKFLOW_VERSION", "2"),
            ("ORDERFLOW_FRAUD_MAX_ORDERS_PER_MINUTE", "5"),
        ])
        .expect("valid");
        assert_eq!(
            (s.workflow_version, s.fraud_max_orders_per_minute),
            (2, Some(5))
        );
    }

    #[test]
    fn bad_rule_settings_are_named_in_the_error() {
        for (name, value) in [
            ("ORDERFLOW_WORKFLOW_VERSION", "3"),
            ("ORDERFLOW_WORKFLOW_VERSION", "two"),
            ("ORDERFLOW_FRAUD_MAX_ORDERS_PER_MINUTE", "0"),
            ("ORDERFLOW_FRAUD_MAX_ORDERS_PER_MINUTE", "-1"),
        ] {
            let vars = [("ORDERFLOW_WORKFLOW_VERSION", "2"), (name, value)];
            let err = with(&vars[usize::from(name == "ORDERFLOW_WORKFLOW_VERSION")..])
                .expect_err("invalid");
            assert_eq!(err.name, name, "{value}");
        }
        // a fraud rule under workflow 1 would silently do nothing: refused
        let err =
            with(&[("ORDERFLOW_FRAUD_MAX_ORDERS_PER_MINUTE", "5")]).expect_err("inconsistent");
        assert_eq!(err.name, "ORDERFLOW_FRAUD_MAX_ORDERS_PER_MINUTE");
        assert!(err.to_string().contains("ORDERFLOW_WORKFLOW_VERSION=2"));
    }

    const FILE: &str = r#"
        review_threshold_cents = 50000
        payment_timeout = "10s"
        workflow_version = 2
        fraud_max_orders_per_minute = 5
        currency = "USD"
    "#;

    #[test]
    fn the_settings_file_sets_and_the_environment_overrides() {
        let file = ConfigFile::parse("orderflow.toml", FILE).expect("valid file");
        let map: HashMap<&str, &str> = [("ORDERFLOW_FRAUD_MAX_ORDERS_PER_MINUTE", "9")]
            .into_iter()
            .collect();
        let s =
            Settings::layered(|k| map.get(k).map(|v| v.to_string()), Some(&file)).expect("valid");
        assert_eq!(s.review_threshold_cents, 50_000);
        assert_eq!(s.payment_timeout, Duration::from_secs(10));
        assert_eq!(s.currency, "USD");
        assert_eq!(s.workflow_version, 2);
        assert_eq!(s.fraud_max_orders_per_minute, Some(9), "env wins");
        assert_eq!(s.review_timeout, Settings::default().review_timeout);
    }

    #[test]
    fn a_bad_settings_file_is_named_in_the_error() {
        let err = ConfigFile::parse("x.toml", "workflow_version = ").expect_err("bad TOML");
        assert_eq!(err.name, "ORDERFLOW_CONFIG");
        let err = ConfigFile::parse("x.toml", "fraud_max_per_minute = 3").expect_err("typo");
        assert!(err
            .to_string()
            .contains("unknown setting 'fraud_max_per_minute'"));
        let err = ConfigFile::read("/nonexistent/orderflow.toml").expect_err("missing");
        assert_eq!(err.name, "ORDERFLOW_CONFIG");
        // a bad value in the file names the setting it is for
        let file = ConfigFile::parse("x.toml", "workflow_version = 7").expect("valid TOML");
        let err = Settings::layered(|_| None, Some(&file)).expect_err("bad version");
        assert_eq!(err.name, "ORDERFLOW_WORKFLOW_VERSION");
    }

    #[test]
    fn the_http_address_defaults_and_can_be_set_or_turned_off() {
        let s = with(&[]).expect("defaults are valid");
        assert_eq!(
            s.http_addr,
            HttpAddr::Default(DEFAULT_HTTP_ADDR.parse().expect("valid"))
        );
        assert_eq!(s.heartbeat_interval, Duration::from_secs(5));
        let s = with(&[("ORDERFLOW_HTTP_ADDR", "off")]).expect("valid");
        assert_eq!(s.http_addr, HttpAddr::Off);
        let s = with(&[
            ("ORDERFLOW_HTTP_ADDR", "0.0.0.0:0"),
            ("ORDERFLOW_HEARTBEAT_INTERVAL", "200ms"),
        ])
        .expect("valid");
        assert_eq!(
            s.http_addr,
            HttpAddr::Set("0.0.0.0:0".parse().expect("valid"))
        );
        assert_eq!(s.heartbeat_interval, Duration::from_millis(200));
        for (name, value) in [
            ("ORDERFLOW_HTTP_ADDR", "localhost"),
            ("ORDERFLOW_HEARTBEAT_INTERVAL", "0s"),
            ("ORDERFLOW_HEARTBEAT_INTERVAL", "often"),
        ] {
            assert_eq!(with(&[(name, value)]).map_err(|e| e.name), Err(name));
        }
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
