use std::{fmt, sync::Arc};

/// Longest room name accepted, in characters.
pub const MAX_ROOM_NAME_LEN: usize = 128;

/// A validated room name: 1 to 128 characters from `[A-Za-z0-9_.:@/-]`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RoomName(Arc<str>);

/// Why a string is not a room name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RoomNameError {
    /// Empty or longer than [`MAX_ROOM_NAME_LEN`].
    #[error("room name must be 1 to {MAX_ROOM_NAME_LEN} characters")]
    Length,
    /// A character outside `[A-Za-z0-9_.:@/-]`.
    #[error("room name may only contain A-Z a-z 0-9 _ . : @ / -")]
    Character,
}

impl RoomName {
    /// Validates `name`.
    pub fn new(name: &str) -> Result<Self, RoomNameError> {
        if name.is_empty() || name.len() > MAX_ROOM_NAME_LEN {
            return Err(RoomNameError::Length);
        }
        if !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_.:@/-".contains(&b))
        {
            return Err(RoomNameError::Character);
        }
        Ok(Self(name.into()))
    }

    /// The name as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for RoomName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_the_documented_alphabet() {
        assert!(RoomName::new("a-Z_0.9:@/x").is_ok());
        assert_eq!(RoomName::new(&"a".repeat(128)).unwrap().as_str().len(), 128);
    }

    #[test]
    fn rejects_empty_long_and_foreign_characters() {
        assert_eq!(RoomName::new(""), Err(RoomNameError::Length));
        assert_eq!(RoomName::new(&"a".repeat(129)), Err(RoomNameError::Length));
        assert_eq!(RoomName::new("a b"), Err(RoomNameError::Character));
        assert_eq!(RoomName::new("é"), Err(RoomNameError::Character));
    }
}
