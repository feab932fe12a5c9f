//! Single-use, expiring tokens: the last path segment of a streaming URL,
//! standing for the CRI request that asked for it.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use k8s_cri::v1 as cri;

use crate::manager::{new_id, CriError};

/// What a token stands for.
#[derive(Debug, Clone)]
pub enum Request {
    Exec(cri::ExecRequest),
    Attach(cri::AttachRequest),
    PortForward(cri::PortForwardRequest),
}

impl Request {
    /// The URL path's first segment for this kind of request.
    pub fn kind(&self) -> &'static str {
        match self {
            Request::Exec(_) => "exec",
            Request::Attach(_) => "attach",
            Request::PortForward(_) => "portforward",
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TokenError {
    #[error("unknown or already used streaming token")]
    Unknown,
    #[error("streaming token expired {0:?} ago")]
    Expired(Duration),
    #[error("the token is for {expected}, not {got}")]
    WrongKind { expected: &'static str, got: String },
}

struct Pending {
    request: Request,
    expires: Instant,
}

/// Tokens handed out and not yet used.
pub struct Tokens {
    ttl: Duration,
    pending: Mutex<HashMap<String, Pending>>,
}

impl Tokens {
    pub fn new(ttl: Duration) -> Tokens {
        Tokens {
            ttl,
            pending: Mutex::new(HashMap::new()),
        }
    }

    /// A fresh token for `request`; tokens expired long enough ago to have
    /// no use even as an error message are dropped on the way.
    pub fn insert(&self, request: Request) -> Result<String, CriError> {
        let token = new_id()?;
        let now = Instant::now();
        let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        pending.retain(|_, p| p.expires + self.ttl > now);
        pending.insert(
            token.clone(),
            Pending {
                request,
                expires: now + self.ttl,
            },
        );
        Ok(token)
    }

    /// Takes the token's request: a token works once, and only before it
    /// expires, and only on the path of its kind.
    pub fn take(&self, kind: &str, token: &str) -> Result<Request, TokenError> {
        let pending = self
            .pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(token)
            .ok_or(TokenError::Unknown)?;
        let now = Instant::now();
        if now > pending.expires {
            return Err(TokenError::Expired(now - pending.expires));
        }
        if pending.request.kind() != kind {
            return Err(TokenError::WrongKind {
                expected: pending.request.kind(),
                got: kind.to_owned(),
            });
        }
        Ok(pending.request)
    }

    /// How many tokens wait to be used (for tests and diagnostics).
    pub fn len(&self) -> usize {
        self.pending.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exec() -> Request {
        Request::Exec(cri::ExecRequest::default())
    }

    #[test]
    fn a_token_works_once_and_only_on_its_path() {
        let tokens = Tokens::new(Duration::from_secs(60));
        let t = tokens.insert(exec()).unwrap();
        assert_eq!(t.len(), 64);
        assert!(tokens.take("exec", &t).is_ok());
        assert_eq!(tokens.take("exec", &t).unwrap_err(), TokenError::Unknown);
        let t = tokens.insert(exec()).unwrap();
        assert!(matches!(
            tokens.take("portforward", &t),
            Err(TokenError::WrongKind { .. })
        ));
        assert!(tokens.is_empty());
    }

    #[test]
    fn tokens_expire() {
        let tokens = Tokens::new(Duration::from_millis(1));
        let t = tokens.insert(exec()).unwrap();
        std::thread::sleep(Duration::from_millis(5));
        assert!(matches!(
            tokens.take("exec", &t),
            Err(TokenError::Expired(_))
        ));
        let old = tokens.insert(exec()).unwrap();
        std::thread::sleep(Duration::from_millis(5));
        // Inserting another drops the long-expired one.
        tokens.insert(exec()).unwrap();
        assert_eq!(tokens.len(), 1);
        assert_eq!(tokens.take("exec", &old).unwrap_err(), TokenError::Unknown);
    }
}
