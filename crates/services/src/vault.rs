//! Data protection by crypto-shredding (issue 7, docs/adr/0004-crypto-shredding.md).
//!
//! The customer's personal data in events (the fields `domain::events::personal_fields`
//! names: the shipping address, the customer's cancel reason) is sealed with a key of
//! that customer, kept outside the log in `customer_keys`. Forgetting the customer
//! deletes the key: every copy of the data in the log, on RabbitMQ and in backups of the
//! log becomes unreadable at once, and the log itself is never rewritten.
//!
//! A sealed field stays a JSON string, `sealed:v1:<key uuid>:<base64url(nonce ‖ ct)>`,
//! sealed with ChaCha20-Poly1305 (a random nonce per field; the key id is the associated
//! data). The domain copies tokens as it copies any string (`OrderPlaced` →
//! `OrderConfirmed` → `ShipmentShipped`), so only the commands intake seals and only the
//! readers that show the clear value (`orderflow events`) open. Opening never fails for
//! a forgotten key: it yields [`FORGOTTEN`], so replays, the saga and audits go on.
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use chacha20poly1305::aead::{Aead, AeadCore, KeyInit, OsRng, Payload};
use chacha20poly1305::{ChaCha20Poly1305, Key, Nonce};
use domain::commands::{CancelOrder, PlaceOrder};
use domain::events::OrderPlaced;
use sqlx::PgPool;
use uuid::Uuid;

/// What a sealed field reads as once its customer was forgotten.
pub const FORGOTTEN: &str = "[forgotten]";
/// What a token reads as when its key exists but does not open it (altered in transit
/// or by hand): shown, never trusted, never an error that would stop a replay.
pub const UNREADABLE: &str = "[unreadable]";

const TOKEN_PREFIX: &str = "sealed:v1:";
const NONCE_BYTES: usize = 12;
const KEY_BYTES: usize = 32;
/// How long a process opens with a cached key before asking the table again: bounds
/// how long a long-running reader may still open data whose key `forget-customer`
/// destroyed in another process. (A destroyed key is cached for good: key ids are
/// never reused. Sealing never uses the cache.)
const KEY_TTL: Duration = Duration::from_secs(30);
/// Cached keys per map before the cache starts afresh (bounded memory).
const CACHE_CAPACITY: usize = 10_000;

#[derive(Debug, thiserror::Error)]
pub enum VaultError {
    #[error("database error in the key vault: {0}")]
    Database(#[from] sqlx::Error),
    #[error("customer key {key_id} is not {KEY_BYTES} bytes long")]
    BadKey { key_id: Uuid },
    #[error("sealing a field failed")]
    Seal,
}

/// One customer's key, in memory. Sealing and opening are synchronous and cheap.
#[derive(Clone)]
pub struct CustomerKey {
    key_id: Uuid,
    cipher: ChaCha20Poly1305,
}

impl std::fmt::Debug for CustomerKey {
    // Never print key material.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CustomerKey")
            .field("key_id", &self.key_id)
            .finish_non_exhaustive()
    }
}

impl CustomerKey {
    /// A fresh key from the OS's random source.
    pub fn generate() -> (Uuid, Vec<u8>) {
        (
            Uuid::new_v4(),
            ChaCha20Poly1305::generate_key(&mut OsRng).to_vec(),
        )
    }

    pub fn from_bytes(key_id: Uuid, bytes: &[u8]) -> Result<CustomerKey, VaultError> {
        if bytes.len() != KEY_BYTES {
            return Err(VaultError::BadKey { key_id });
        }
        Ok(CustomerKey {
            key_id,
            cipher: ChaCha20Poly1305::new(Key::from_slice(bytes)),
        })
    }

    pub fn key_id(&self) -> Uuid {
        self.key_id
    }

    /// Seals `clear` into a token (a fresh random nonce every time).
    pub fn seal(&self, clear: &str) -> Result<String, VaultError> {
        let nonce = ChaCha20Poly1305::generate_nonce(&mut OsRng);
        let aad = self.key_id.as_bytes();
        let ct = self
            .cipher
            .encrypt(
                &nonce,
                Payload {
                    msg: clear.as_bytes(),
                    aad,
                },
            )
            .map_err(|_| VaultError::Seal)?;
        let mut sealed = nonce.to_vec();
        sealed.extend_from_slice(&ct);
        Ok(format!(
            "{TOKEN_PREFIX}{}:{}",
            self.key_id,
            URL_SAFE_NO_PAD.encode(sealed)
        ))
    }

    /// The clear text of a token sealed with this key; `None` if it is not one or does
    /// not authenticate.
    pub fn open(&self, token: &Token) -> Option<String> {
        if token.key_id != self.key_id || token.sealed.len() < NONCE_BYTES {
            return None;
        }
        let (nonce, ct) = token.sealed.split_at(NONCE_BYTES);
        let clear = self
            .cipher
            .decrypt(
                Nonce::from_slice(nonce),
                Payload {
                    msg: ct,
                    aad: self.key_id.as_bytes(),
                },
            )
            .ok()?;
        String::from_utf8(clear).ok()
    }

    /// Whether `text` is a token of this key that opens to `clear`.
    fn opens_to(&self, text: &str, clear: &str) -> bool {
        Token::parse(text).and_then(|t| self.open(&t)).as_deref() == Some(clear)
    }
}

/// A parsed sealed field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Token {
    pub key_id: Uuid,
    sealed: Vec<u8>,
}

impl Token {
    /// `None` for anything that is not a well-formed token (e.g. clear text of events
    /// written before sealing began).
    pub fn parse(text: &str) -> Option<Token> {
        let rest = text.strip_prefix(TOKEN_PREFIX)?;
        let (key_id, sealed) = rest.split_once(':')?;
        Some(Token {
            key_id: Uuid::parse_str(key_id).ok()?,
            sealed: URL_SAFE_NO_PAD.decode(sealed).ok()?,
        })
    }
}

/// Whether `text` is a sealed field.
pub fn is_sealed(text: &str) -> bool {
    Token::parse(text).is_some()
}

/// An `order.place` with its address sealed, ready for the saga. Sealing happens once
/// per message, before the decision; the saga may decide several times (concurrency
/// retries), each time against the stream as it then is.
#[derive(Debug, Clone)]
pub struct SealedPlacement {
    key: CustomerKey,
    clear_address: Option<String>,
    sealed: PlaceOrder,
}

impl SealedPlacement {
    pub fn seal(key: CustomerKey, cmd: PlaceOrder) -> Result<SealedPlacement, VaultError> {
        let clear_address = cmd.shipping.as_ref().map(|s| s.address.clone());
        let mut sealed = cmd;
        if let Some(shipping) = sealed.shipping.as_mut() {
            shipping.address = key.seal(&shipping.address)?;
        }
        Ok(SealedPlacement {
            key,
            clear_address,
            sealed,
        })
    }

    /// The command to decide on, given what the order's stream already holds. When the
    /// order was placed with the same address, the stored value is used, so that the
    /// saga sees the same content (a repeated placement has no effect) although each
    /// sealing draws a new nonce.
    pub fn against(&self, placed: Option<&OrderPlaced>) -> PlaceOrder {
        let mut cmd = self.sealed.clone();
        let stored = placed.and_then(|p| p.shipping.as_ref());
        if let (Some(shipping), Some(stored), Some(clear)) =
            (cmd.shipping.as_mut(), stored, self.clear_address.as_deref())
        {
            if stored.address == clear || self.key.opens_to(&stored.address, clear) {
                shipping.address = stored.address.clone();
            }
        }
        cmd
    }
}

/// The outcome of `forget-customer`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Forgotten {
    /// The key was destroyed now.
    Now { key_id: Uuid },
    /// No key is left: the customer was forgotten before (and has placed no order
    /// since).
    Already {
        forgotten_at: chrono::DateTime<chrono::Utc>,
    },
    /// No key and no record of one: nothing of this customer was ever sealed.
    Unknown,
}

/// A cache entry: the key, or `None` for a key known to be gone.
type Cached = (Option<CustomerKey>, Instant);

/// Keys from `customer_keys`. Sealing asks the table every time (one primary-key
/// lookup, see [`Vault::key_for`]); opening caches keys by id, so reading many fields of
/// one customer costs one indexed query per [`KEY_TTL`].
pub struct Vault {
    pool: PgPool,
    /// Keys by id for opening; `None` = destroyed (final: key ids are never reused).
    by_id: Mutex<HashMap<Uuid, Cached>>,
}

impl Vault {
    pub fn new(pool: PgPool) -> Vault {
        Vault {
            pool,
            by_id: Mutex::new(HashMap::new()),
        }
    }

    /// The customer's current key, created on first use. A customer forgotten before
    /// gets a new key: nothing sealed under the destroyed one comes back.
    ///
    /// Always asks the table (one primary-key lookup), never a cache: sealing with a key
    /// that `forget-customer` destroyed in another process a moment ago would make the
    /// new data unreadable at once.
    pub async fn key_for(&self, customer_id: &str) -> Result<CustomerKey, VaultError> {
        let current: Option<(Uuid, Vec<u8>)> =
            sqlx::query_as("SELECT key_id, key FROM customer_keys WHERE customer_id = $1")
                .bind(customer_id)
                .fetch_optional(&self.pool)
                .await?;
        let key = match current {
            Some((key_id, bytes)) => CustomerKey::from_bytes(key_id, &bytes)?,
            None => self.create(customer_id).await?,
        };
        insert_bounded(&self.by_id, key.key_id, (Some(key.clone()), Instant::now()));
        Ok(key)
    }

    async fn create(&self, customer_id: &str) -> Result<CustomerKey, VaultError> {
        let (new_id, new_key) = CustomerKey::generate();
        // Two processes may create the same customer's key at once: the primary key
        // keeps the first, and the loser reads it in a second statement (a fresh
        // snapshot, so it sees the winner's committed row).
        let inserted: Option<(Uuid, Vec<u8>)> = sqlx::query_as(
            "INSERT INTO customer_keys (customer_id, key_id, key) VALUES ($1, $2, $3)
             ON CONFLICT (customer_id) DO NOTHING RETURNING key_id, key",
        )
        .bind(customer_id)
        .bind(new_id)
        .bind(&new_key)
        .fetch_optional(&self.pool)
        .await?;
        let (key_id, key) = match inserted {
            Some(row) => row,
            None => {
                sqlx::query_as("SELECT key_id, key FROM customer_keys WHERE customer_id = $1")
                    .bind(customer_id)
                    .fetch_one(&self.pool)
                    .await?
            }
        };
        CustomerKey::from_bytes(key_id, &key)
    }

    /// The key a token names, or `None` when it was destroyed.
    async fn key_by_id(&self, key_id: Uuid) -> Result<Option<CustomerKey>, VaultError> {
        if let Some(cached) = self.cached_id(key_id) {
            return Ok(cached);
        }
        let row: Option<Vec<u8>> =
            sqlx::query_scalar("SELECT key FROM customer_keys WHERE key_id = $1")
                .bind(key_id)
                .fetch_optional(&self.pool)
                .await?;
        let key = row
            .map(|bytes| CustomerKey::from_bytes(key_id, &bytes))
            .transpose()?;
        insert_bounded(&self.by_id, key_id, (key.clone(), Instant::now()));
        Ok(key)
    }

    /// The clear value of a field: a token is opened (or reads as [`FORGOTTEN`] /
    /// [`UNREADABLE`]); anything else (events written before sealing) is returned as is.
    pub async fn open_text(&self, text: &str) -> Result<String, VaultError> {
        let Some(token) = Token::parse(text) else {
            return Ok(text.to_owned());
        };
        Ok(match self.key_by_id(token.key_id).await? {
            None => FORGOTTEN.to_owned(),
            Some(key) => key.open(&token).unwrap_or_else(|| UNREADABLE.to_owned()),
        })
    }

    /// Opens, in place, the personal fields of a stored payload of `event_type`.
    pub async fn open_payload(
        &self,
        event_type: &str,
        payload: &mut serde_json::Value,
    ) -> Result<(), VaultError> {
        for path in domain::events::personal_fields(event_type) {
            if let Some(serde_json::Value::String(text)) = field_mut(payload, path) {
                let clear = self.open_text(text).await?;
                *text = clear;
            }
        }
        Ok(())
    }

    /// Seals the customer's free text of an `order.cancel` with the key of the
    /// customer who placed the order.
    pub async fn seal_cancel(
        &self,
        customer_id: &str,
        mut cmd: CancelOrder,
    ) -> Result<CancelOrder, VaultError> {
        let key = self.key_for(customer_id).await?;
        cmd.reason = key.seal(&cmd.reason)?;
        Ok(cmd)
    }

    /// Destroys the customer's key and records that it was destroyed (the tombstone
    /// says when; the key is gone). Sealed data under it reads as [`FORGOTTEN`] from
    /// now on, in this process at once and in others within the cache's lifetime.
    pub async fn forget(&self, customer_id: &str) -> Result<Forgotten, VaultError> {
        let destroyed: Option<Uuid> = sqlx::query_scalar(
            "WITH gone AS (DELETE FROM customer_keys WHERE customer_id = $1
                           RETURNING customer_id, key_id)
             INSERT INTO forgotten_customers (key_id, customer_id)
             SELECT key_id, customer_id FROM gone RETURNING key_id",
        )
        .bind(customer_id)
        .fetch_optional(&self.pool)
        .await?;
        self.forget_cached(destroyed);
        if let Some(key_id) = destroyed {
            return Ok(Forgotten::Now { key_id });
        }
        let before: Option<chrono::DateTime<chrono::Utc>> = sqlx::query_scalar(
            "SELECT max(forgotten_at) FROM forgotten_customers WHERE customer_id = $1",
        )
        .bind(customer_id)
        .fetch_one(&self.pool)
        .await?;
        Ok(
            before.map_or(Forgotten::Unknown, |forgotten_at| Forgotten::Already {
                forgotten_at,
            }),
        )
    }

    fn cached_id(&self, key_id: Uuid) -> Option<Option<CustomerKey>> {
        let cache = lock(&self.by_id);
        cache
            .get(&key_id)
            .filter(|(_, at)| at.elapsed() < KEY_TTL)
            .map(|(key, _)| key.clone())
    }

    fn forget_cached(&self, key_id: Option<Uuid>) {
        if let Some(key_id) = key_id {
            insert_bounded(&self.by_id, key_id, (None, Instant::now()));
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn insert_bounded<K: std::hash::Hash + Eq, V>(cache: &Mutex<HashMap<K, V>>, key: K, value: V) {
    let mut map = lock(cache);
    if map.len() >= CACHE_CAPACITY {
        map.clear();
    }
    map.insert(key, value);
}

/// The value at `path` inside `payload`, if every step is an object key.
fn field_mut<'a>(
    payload: &'a mut serde_json::Value,
    path: &[&str],
) -> Option<&'a mut serde_json::Value> {
    path.iter()
        .try_fold(payload, |value, key| value.get_mut(*key))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> CustomerKey {
        let (id, bytes) = CustomerKey::generate();
        CustomerKey::from_bytes(id, &bytes).expect("a generated key has the right length")
    }

    #[test]
    fn a_sealed_field_opens_to_its_clear_text_and_hides_it() {
        let key = key();
        let token = key.seal("1 Main St, Springfield").expect("sealing works");
        assert!(token.starts_with("sealed:v1:"));
        assert!(!token.contains("Main"));
        let parsed = Token::parse(&token).expect("a token parses");
        assert_eq!(parsed.key_id, key.key_id());
        assert_eq!(key.open(&parsed).as_deref(), Some("1 Main St, Springfield"));
    }

    #[test]
    fn every_seal_draws_a_new_nonce() {
        let key = key();
        let a = key.seal("same").expect("sealing works");
        let b = key.seal("same").expect("sealing works");
        assert_ne!(a, b);
    }

    #[test]
    fn another_key_or_an_altered_token_does_not_open() {
        let (key, other) = (key(), key());
        let token = key.seal("secret").expect("sealing works");
        let parsed = Token::parse(&token).expect("a token parses");
        assert_eq!(other.open(&parsed), None);
        // the same bytes claimed for another key: the key id is authenticated data
        let moved = Token {
            key_id: other.key_id(),
            ..parsed.clone()
        };
        assert_eq!(other.open(&moved), None);
        let mut flipped = parsed;
        if let Some(last) = flipped.sealed.last_mut() {
            *last ^= 1;
        }
        assert_eq!(key.open(&flipped), None);
    }

    #[test]
    fn clear_text_and_malformed_tokens_are_not_tokens() {
        assert!(!is_sealed("1 Main St"));
        assert!(!is_sealed("sealed:v1:not-a-uuid:AAAA"));
        assert!(!is_sealed(&format!("sealed:v1:{}:***", Uuid::nil())));
        assert!(CustomerKey::from_bytes(Uuid::nil(), &[0; 16]).is_err());
    }

    #[test]
    fn a_repeated_placement_reuses_the_stored_token_only_for_the_same_address() {
        use domain::commands::{Shipping, ShippingMethod};
        let key = key();
        let cmd = |address: &str| PlaceOrder {
            order_id: Uuid::nil(),
            customer_id: "c-1".into(),
            currency: "EUR".into(),
            items: vec![],
            payment_token: "tok_ok".into(),
            shipping: Some(Shipping {
                method: ShippingMethod::Standard,
                address: address.into(),
            }),
        };
        let address = |c: PlaceOrder| c.shipping.map(|s| s.address);
        let seal = |a: &str| SealedPlacement::seal(key.clone(), cmd(a)).expect("sealed");
        let first = seal("1 Main St").against(None);
        let stored = address(first.clone());
        assert!(stored.as_deref().is_some_and(is_sealed));
        let placed = OrderPlaced {
            order_id: Uuid::nil(),
            customer_id: "c-1".into(),
            currency: "EUR".into(),
            items: vec![],
            payment_token: "tok_ok".into(),
            shipping: first.shipping.clone(),
            total_cents: 0,
            item_count: 0,
            plan: domain::Rules::default().plan_for(&first),
        };
        assert_eq!(address(seal("1 Main St").against(Some(&placed))), stored);
        let other = address(seal("2 Elm St").against(Some(&placed)));
        assert_ne!(other, stored);
        assert!(other.as_deref().is_some_and(is_sealed));
        // an order placed before sealing began holds the address in clear
        let mut clear = placed;
        clear.shipping = cmd("1 Main St").shipping;
        assert_eq!(
            address(seal("1 Main St").against(Some(&clear))).as_deref(),
            Some("1 Main St")
        );
    }

    #[test]
    fn personal_fields_are_found_by_path() {
        let mut payload = serde_json::json!({"shipping": {"address": "x"}, "detail": "y"});
        assert_eq!(
            field_mut(&mut payload, &["shipping", "address"]).map(|v| v.clone()),
            Some(serde_json::json!("x"))
        );
        assert!(field_mut(&mut payload, &["shipping", "nope"]).is_none());
    }
}
