//! Sizes as PostgreSQL writes its memory units ("16MB"), which Patroni also
//! accepts in a health check's `lag`: the file's `proxy.replica_max_lag`
//! and the REST API's `?lag=` read them the same way.

/// Bytes from "16777216", "16MB", "16kB"...; `None` when it is not a size
/// or does not fit in 64 bits.
pub fn parse_size(text: &str) -> Option<u64> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: u64 = number.parse().ok()?;
    let factor: u64 = match unit.trim() {
        "" | "B" => 1,
        "kB" | "KB" => 1 << 10,
        "MB" => 1 << 20,
        "GB" => 1 << 30,
        "TB" => 1 << 40,
        _ => return None,
    };
    number.checked_mul(factor)
}

#[cfg(test)]
mod tests {
    use super::parse_size;

    #[test]
    fn sizes_take_postgresql_units() {
        assert_eq!(parse_size("10485760"), Some(10_485_760));
        assert_eq!(parse_size("10MB"), Some(10 << 20));
        assert_eq!(parse_size("16kB"), Some(16 << 10));
        assert_eq!(parse_size("1GB"), Some(1 << 30));
        assert_eq!(parse_size("0"), Some(0));
        assert_eq!(parse_size("ten"), None);
        assert_eq!(parse_size("10 parsecs"), None);
        assert_eq!(parse_size("-1"), None);
        assert_eq!(parse_size("99999999999999TB"), None);
    }
}
