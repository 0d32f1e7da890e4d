//! The nine TSL data types (PROTOCOL.md section 4.2).

/// A TSL data type, as named in an Item's `type` and in a thing model's `dataType.type`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DataKind {
    Int,
    Bool,
    Float,
    Text,
    Date,
    Enum,
    Struct,
    Array,
    Double,
}

impl DataKind {
    pub const ALL: [Self; 9] = [
        Self::Int,
        Self::Bool,
        Self::Float,
        Self::Text,
        Self::Date,
        Self::Enum,
        Self::Struct,
        Self::Array,
        Self::Double,
    ];

    /// The lower-case name ringlink sends.
    pub const fn name(self) -> &'static str {
        match self {
            Self::Int => "int",
            Self::Bool => "bool",
            Self::Float => "float",
            Self::Text => "text",
            Self::Date => "date",
            Self::Enum => "enum",
            Self::Struct => "struct",
            Self::Array => "array",
            Self::Double => "double",
        }
    }

    /// The numeric code of the early protocol draft (0-8).
    pub const fn code(self) -> u8 {
        match self {
            Self::Int => 0,
            Self::Bool => 1,
            Self::Float => 2,
            Self::Text => 3,
            Self::Date => 4,
            Self::Enum => 5,
            Self::Struct => 6,
            Self::Array => 7,
            Self::Double => 8,
        }
    }

    /// Parses a type name; names are lower case on the wire and in TSL files.
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.name() == name)
    }

    /// Parses a numeric type code 0-8.
    pub fn from_code(code: u64) -> Option<Self> {
        Self::ALL.into_iter().find(|k| u64::from(k.code()) == code)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_codes_round_trip() {
        for k in DataKind::ALL {
            assert_eq!(DataKind::from_name(k.name()), Some(k));
            assert_eq!(DataKind::from_code(u64::from(k.code())), Some(k));
        }
        assert_eq!(DataKind::from_name("Int"), None);
        assert_eq!(DataKind::from_code(9), None);
        assert_eq!(DataKind::from_code(8), Some(DataKind::Double));
    }
}
