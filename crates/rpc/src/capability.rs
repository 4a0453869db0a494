//! Capabilities (seed 003's `read_cap` / `write_cap`): signed, expiring tokens that let their
//! holder read (or write) one shard of one object, with no other access to the cluster.
//!
//! A token is `cap1.<claims>.<mac>`: the postcard-encoded [`CapClaims`] and an HMAC-SHA256 over
//! them with the container's capability key, both in hex. The engine holding the shard checks
//! the MAC with the same key, the expiry, the rights, and that the request names the object,
//! target and group of the claims; anything else is refused.
//!
//! The key lives in the container's property [`CAP_KEY_PROP`], readable by the servers and by
//! holders of the cluster file (the management service has no client authentication yet), so a
//! capability protects against parties that hold only the token.

use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use strata_types::{ContId, Oid, PoolId, TargetId};

/// Container property with the capability key (64 hex digits).
pub const CAP_KEY_PROP: &str = "cap.key";
pub const CAP_KEY_BYTES: usize = 32;
/// Longest token accepted (claims are ~80 bytes).
pub const CAP_TOKEN_BYTES_MAX: usize = 1024;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum CapRights {
    Read,
    Write,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CapClaims {
    /// Format version of the claims (v1).
    pub version: u8,
    pub pool: PoolId,
    pub cont: ContId,
    pub oid: Oid,
    /// The shard: its target and the redundancy group it belongs to.
    pub target: TargetId,
    pub group: u32,
    pub rights: CapRights,
    /// Unix time in milliseconds after which the token is refused.
    pub expires_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CapError {
    #[error("not a capability token (expected cap1.<claims>.<mac>)")]
    Malformed,
    #[error("capability signature does not match (forged, altered, or signed with another key)")]
    BadSignature,
    #[error("capability expired {0} ms ago")]
    Expired(u64),
    #[error("capability grants {granted:?}, not {wanted:?}")]
    Rights { granted: CapRights, wanted: CapRights },
    #[error("capability is for {0}, not for this request")]
    Scope(String),
    #[error("capability key of the container is unusable: {0}")]
    Key(String),
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if s.len() % 2 != 0 {
        return None;
    }
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok()).collect()
}

pub fn parse_key(hex_key: &str) -> Result<Vec<u8>, CapError> {
    match unhex(hex_key) {
        Some(k) if k.len() == CAP_KEY_BYTES => Ok(k),
        _ => Err(CapError::Key(format!("{CAP_KEY_PROP} must be {} hex digits", CAP_KEY_BYTES * 2))),
    }
}

pub fn key_to_hex(key: &[u8]) -> String {
    hex(key)
}

fn mac(key: &[u8], msg: &[u8]) -> Hmac<Sha256> {
    let mut m = <Hmac<Sha256> as Mac>::new_from_slice(key).expect("HMAC accepts keys of any length");
    m.update(msg);
    m
}

pub fn sign(key: &[u8], claims: &CapClaims) -> String {
    let body = postcard::to_allocvec(claims).expect("claims always serialize");
    format!("cap1.{}.{}", hex(&body), hex(&mac(key, &body).finalize().into_bytes()))
}

/// The claims of a token, unverified (to find the key and the engine to ask).
pub fn peek(token: &str) -> Result<CapClaims, CapError> {
    if token.len() > CAP_TOKEN_BYTES_MAX {
        return Err(CapError::Malformed);
    }
    let mut parts = token.trim().split('.');
    let (Some("cap1"), Some(body), Some(_), None) = (parts.next(), parts.next(), parts.next(), parts.next()) else { return Err(CapError::Malformed) };
    let body = unhex(body).ok_or(CapError::Malformed)?;
    let claims: CapClaims = postcard::from_bytes(&body).map_err(|_| CapError::Malformed)?;
    if claims.version != 1 {
        return Err(CapError::Malformed);
    }
    Ok(claims)
}

/// Check a token's signature and expiry; returns its claims.
pub fn verify(key: &[u8], token: &str, now_ms: u64) -> Result<CapClaims, CapError> {
    let claims = peek(token)?;
    let mut parts = token.trim().split('.').skip(1);
    let body = parts.next().and_then(unhex).ok_or(CapError::Malformed)?;
    let sig = parts.next().and_then(unhex).ok_or(CapError::Malformed)?;
    mac(key, &body).verify_slice(&sig).map_err(|_| CapError::BadSignature)?;
    if now_ms > claims.expires_ms {
        return Err(CapError::Expired(now_ms - claims.expires_ms));
    }
    Ok(claims)
}

pub fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use strata_types::{ObjectClass, ObjectType};

    fn claims(expires_ms: u64) -> CapClaims {
        let oid = Oid::new(ObjectType::Array, "RP_2G1".parse::<ObjectClass>().unwrap(), 42);
        CapClaims { version: 1, pool: PoolId::new_random(), cont: ContId::new_random(), oid, target: TargetId::new(1, 0), group: 0, rights: CapRights::Read, expires_ms }
    }

    #[test]
    fn signed_tokens_verify_and_forgeries_do_not() {
        let key = [7u8; CAP_KEY_BYTES];
        let c = claims(2_000);
        let t = sign(&key, &c);
        assert_eq!(verify(&key, &t, 1_000), Ok(c.clone()));
        assert_eq!(verify(&key, &t, 3_000), Err(CapError::Expired(1_000)));
        assert_eq!(verify(&[8u8; CAP_KEY_BYTES], &t, 1_000), Err(CapError::BadSignature));
        // Altered claims (write instead of read) keep the old signature: refused.
        let mut w = c.clone();
        w.rights = CapRights::Write;
        let forged = format!("cap1.{}.{}", hex(&postcard::to_allocvec(&w).unwrap()), t.rsplit('.').next().unwrap());
        assert_eq!(verify(&key, &forged, 1_000), Err(CapError::BadSignature));
        assert_eq!(verify(&key, "cap1.zz.00", 1_000), Err(CapError::Malformed));
        assert_eq!(parse_key(&key_to_hex(&key)).unwrap(), key.to_vec());
    }
}
