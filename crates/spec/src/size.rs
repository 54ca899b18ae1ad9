//! Sizes as written in `nonstop.toml`: an integer number of bytes
//! (`65536`) or a string of a number and a unit (`"64KiB"`, `"100MiB"`,
//! `"10m"`).

/// The accepted forms, for error messages.
pub const SIZE_FORMS: &str = "a whole number of bytes (65536) or a string with a unit: \"64KiB\", \"100MiB\", \"1GiB\" (KiB, MiB, GiB and nginx's k, m, g are powers of 1024; KB, MB, GB of 1000)";

const UNITS: [(&str, u64); 10] = [
    ("b", 1),
    ("k", 1 << 10),
    ("kib", 1 << 10),
    ("kb", 1_000),
    ("m", 1 << 20),
    ("mib", 1 << 20),
    ("mb", 1_000_000),
    ("g", 1 << 30),
    ("gib", 1 << 30),
    ("gb", 1_000_000_000),
];

/// Why a size string was refused (the caller adds location and forms).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SizeError {
    Empty,
    Malformed(&'static str),
    TooLarge,
}

impl SizeError {
    pub fn reason(&self) -> &'static str {
        match self {
            SizeError::Empty => "it is empty",
            SizeError::Malformed(why) => why,
            SizeError::TooLarge => "it is too large",
        }
    }
}

/// Parses `"64KiB"` and friends: whole numbers, one unit (any case),
/// optional spaces between them.
pub fn parse_size(text: &str) -> Result<u64, SizeError> {
    let text = text.trim();
    if text.is_empty() {
        return Err(SizeError::Empty);
    }
    let digits = text.bytes().take_while(u8::is_ascii_digit).count();
    if digits == 0 {
        return Err(if text.starts_with('-') {
            SizeError::Malformed("it is negative")
        } else {
            SizeError::Malformed("it does not start with a number")
        });
    }
    let number: u64 = text[..digits].parse().map_err(|_| SizeError::TooLarge)?;
    let unit = text[digits..].trim();
    if unit.starts_with('.') {
        return Err(SizeError::Malformed(
            "fractions are not allowed: use a smaller unit (\"1536KiB\", not \"1.5MiB\")",
        ));
    }
    if unit.is_empty() {
        return Err(SizeError::Malformed("the unit is missing"));
    }
    let lower = unit.to_ascii_lowercase();
    let Some((_, factor)) = UNITS.iter().find(|(u, _)| *u == lower) else {
        return Err(SizeError::Malformed("the unit is not one of B, KiB, MiB, GiB, KB, MB, GB, k, m, g"));
    };
    number.checked_mul(*factor).ok_or(SizeError::TooLarge)
}

/// `65536` → `"64KiB"`: the largest binary unit that divides it.
pub fn format_size(bytes: u64) -> String {
    for (unit, factor) in [("GiB", 1u64 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)] {
        // Powers of two: a mask tells divisibility.
        if bytes >= factor && bytes & (factor - 1) == 0 {
            return format!("{}{unit}", bytes / factor);
        }
    }
    format!("{bytes}B")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_with_units() {
        assert_eq!(parse_size("64KiB"), Ok(65536));
        assert_eq!(parse_size("100 MiB"), Ok(100 << 20));
        assert_eq!(parse_size("10m"), Ok(10 << 20));
        assert_eq!(parse_size("1gb"), Ok(1_000_000_000));
        assert_eq!(parse_size("512B"), Ok(512));
        assert_eq!(parse_size("8k"), Ok(8192));
    }

    #[test]
    fn bad_sizes_say_why() {
        assert_eq!(parse_size(" "), Err(SizeError::Empty));
        assert_eq!(parse_size("-1MiB"), Err(SizeError::Malformed("it is negative")));
        assert_eq!(parse_size("100"), Err(SizeError::Malformed("the unit is missing")));
        assert!(matches!(parse_size("1.5MiB"), Err(SizeError::Malformed(m)) if m.contains("fractions")));
        assert!(matches!(parse_size("3 parsecs"), Err(SizeError::Malformed(m)) if m.contains("unit is not")));
        assert_eq!(parse_size("99999999999999999999GiB"), Err(SizeError::TooLarge));
        assert_eq!(parse_size("99999999999GiB"), Err(SizeError::TooLarge));
    }

    #[test]
    fn sizes_format_back() {
        for n in [65536u64, 100 << 20, 1 << 30, 1000, 8192] {
            assert_eq!(parse_size(&format_size(n)), Ok(n));
        }
        assert_eq!(format_size(100 << 20), "100MiB");
    }
}
