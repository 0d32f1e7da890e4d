//! Link IoT Edge result codes (PROTOCOL.md section 6) and the texts ringlink sends with them.

use std::fmt;

/// A result code of the Link IoT Edge WebSocket protocol.
///
/// Known codes have variants; codes a client sends that ringlink does not know are carried as
/// [`Code::Other`] and passed upstream unchanged.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Code {
    Success,
    Unknown,
    InvalidParameter,
    Timeout,
    OutOfRange,
    ServiceUnreachable,
    DeviceNotRegistered,
    DeviceOffline,
    PropertyNotExist,
    PropertyReadOnly,
    PropertyWriteOnly,
    ServiceNotExist,
    ServiceInputIncorrect,
    JsonFormat,
    ParameterType,
    /// A code ringlink does not send itself (for example one of the SDK's local codes in a client
    /// reply); kept as a number so that it can be passed on unchanged.
    Other(u32),
}

impl Code {
    /// Every code ringlink itself sends, for tests and metric labels.
    pub const SENT: [Self; 15] = [
        Self::Success,
        Self::Unknown,
        Self::InvalidParameter,
        Self::Timeout,
        Self::OutOfRange,
        Self::ServiceUnreachable,
        Self::DeviceNotRegistered,
        Self::DeviceOffline,
        Self::PropertyNotExist,
        Self::PropertyReadOnly,
        Self::PropertyWriteOnly,
        Self::ServiceNotExist,
        Self::ServiceInputIncorrect,
        Self::JsonFormat,
        Self::ParameterType,
    ];

    /// The numeric code on the wire.
    pub const fn as_u32(self) -> u32 {
        match self {
            Self::Success => 0,
            Self::Unknown => 100_000,
            Self::InvalidParameter => 100_001,
            Self::Timeout => 100_006,
            Self::OutOfRange => 100_007,
            Self::ServiceUnreachable => 100_008,
            Self::DeviceNotRegistered => 109_000,
            Self::DeviceOffline => 109_001,
            Self::PropertyNotExist => 109_002,
            Self::PropertyReadOnly => 109_003,
            Self::PropertyWriteOnly => 109_004,
            Self::ServiceNotExist => 109_005,
            Self::ServiceInputIncorrect => 109_006,
            Self::JsonFormat => 109_007,
            Self::ParameterType => 109_008,
            Self::Other(n) => n,
        }
    }

    /// The code for a number seen on the wire.
    pub fn from_u32(n: u32) -> Self {
        Self::SENT
            .into_iter()
            .find(|c| c.as_u32() == n)
            .unwrap_or(Self::Other(n))
    }

    /// The `message` text ringlink sends with this code (PROTOCOL.md section 6).
    pub const fn message(self) -> &'static str {
        match self {
            Self::Success => "Success",
            Self::Unknown | Self::Other(_) => "Unknown error",
            Self::InvalidParameter => "Invalid parameter",
            Self::Timeout => "Timeout",
            Self::OutOfRange => "Parameter out of range",
            Self::ServiceUnreachable => "Service unreachable",
            Self::DeviceNotRegistered => "Device not registered",
            Self::DeviceOffline => "Device offline",
            Self::PropertyNotExist => "Property does not exist",
            Self::PropertyReadOnly => "Property is read-only",
            Self::PropertyWriteOnly => "Property is write-only",
            Self::ServiceNotExist => "Service does not exist",
            Self::ServiceInputIncorrect => "Service input parameters incorrect",
            Self::JsonFormat => "JSON format error",
            Self::ParameterType => "Parameter type error",
        }
    }

    /// A short stable label for metrics (`"0"`, `"109001"`, ...).
    pub fn label(self) -> String {
        self.as_u32().to_string()
    }

    pub const fn is_success(self) -> bool {
        matches!(self, Self::Success)
    }
}

impl fmt::Display for Code {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.as_u32(), self.message())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_round_trip_and_match_protocol_table() {
        let table = [
            (0, "Success"),
            (100_000, "Unknown error"),
            (100_001, "Invalid parameter"),
            (100_006, "Timeout"),
            (100_007, "Parameter out of range"),
            (100_008, "Service unreachable"),
            (109_000, "Device not registered"),
            (109_001, "Device offline"),
            (109_002, "Property does not exist"),
            (109_003, "Property is read-only"),
            (109_004, "Property is write-only"),
            (109_005, "Service does not exist"),
            (109_006, "Service input parameters incorrect"),
            (109_007, "JSON format error"),
            (109_008, "Parameter type error"),
        ];
        assert_eq!(table.len(), Code::SENT.len());
        for (n, text) in table {
            let code = Code::from_u32(n);
            assert_eq!(code.as_u32(), n);
            assert_eq!(code.message(), text);
            assert!(!matches!(code, Code::Other(_)));
        }
    }

    #[test]
    fn unknown_numbers_pass_through() {
        assert_eq!(Code::from_u32(109_014), Code::Other(109_014));
        assert_eq!(Code::Other(109_014).as_u32(), 109_014);
    }
}
