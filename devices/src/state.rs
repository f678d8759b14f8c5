//! The one save/restore trait every device (and later the VM) implements; snapshots,
//! migration and COLO checkpoints all go through it.

use serde::{de::DeserializeOwned, Deserialize, Serialize};

/// Errors saving or restoring state.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// The state belongs to another kind of component.
    #[error("state is for a {found}, not a {expected}")]
    WrongKind {
        /// The kind this component is.
        expected: String,
        /// The kind recorded in the state.
        found: String,
    },
    /// The state was written by an incompatible version.
    #[error("{kind} state version {found} is not supported (this build reads {supported})")]
    Version {
        /// The component kind.
        kind: String,
        /// The version in the state.
        found: u32,
        /// The version this build understands.
        supported: u32,
    },
    /// The state does not fit this component's configuration (e.g. a different disk size).
    #[error("{kind} state does not match the configuration: {why}")]
    Mismatch {
        /// The component kind.
        kind: String,
        /// What differs.
        why: String,
    },
    /// The state could not be encoded or decoded.
    #[error("{kind} state encoding: {why}")]
    Encoding {
        /// The component kind.
        kind: String,
        /// The serde error.
        why: String,
    },
}

/// A component's saved state: what it is, which format version, and the encoded fields.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ComponentState {
    /// The component kind, e.g. "virtio-blk".
    pub kind: String,
    /// The format version of `data`.
    pub version: u32,
    /// The fields, JSON-encoded.
    pub data: Vec<u8>,
}

impl ComponentState {
    /// Encodes `value` as the state of a `kind` at `version`.
    pub fn encode<T: Serialize>(kind: &str, version: u32, value: &T) -> Result<Self, StateError> {
        let data = serde_json::to_vec(value).map_err(|e| StateError::Encoding {
            kind: kind.to_string(),
            why: e.to_string(),
        })?;
        Ok(Self {
            kind: kind.to_string(),
            version,
            data,
        })
    }

    /// Decodes the fields after checking the kind and the version.
    pub fn decode<T: DeserializeOwned>(&self, kind: &str, version: u32) -> Result<T, StateError> {
        if self.kind != kind {
            return Err(StateError::WrongKind {
                expected: kind.to_string(),
                found: self.kind.clone(),
            });
        }
        if self.version != version {
            return Err(StateError::Version {
                kind: kind.to_string(),
                found: self.version,
                supported: version,
            });
        }
        serde_json::from_slice(&self.data).map_err(|e| StateError::Encoding {
            kind: kind.to_string(),
            why: e.to_string(),
        })
    }
}

/// Save and restore of a component's guest-visible state.
pub trait Stateful {
    /// Captures the state; the component must be quiescent (vCPUs paused).
    fn save_state(&self) -> Result<ComponentState, StateError>;
    /// Replaces the state with `state`, refusing incompatible ones without changing anything.
    fn restore_state(&mut self, state: &ComponentState) -> Result<(), StateError>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct Fields {
        a: u32,
    }

    #[test]
    fn round_trip_and_refusals() {
        let s = ComponentState::encode("thing", 2, &Fields { a: 7 }).unwrap();
        assert_eq!(s.decode::<Fields>("thing", 2).unwrap(), Fields { a: 7 });
        assert!(matches!(
            s.decode::<Fields>("other", 2),
            Err(StateError::WrongKind { .. })
        ));
        assert!(matches!(
            s.decode::<Fields>("thing", 3),
            Err(StateError::Version { .. })
        ));
        let mut bad = s.clone();
        bad.data = b"{".to_vec();
        assert!(matches!(
            bad.decode::<Fields>("thing", 2),
            Err(StateError::Encoding { .. })
        ));
    }
}
