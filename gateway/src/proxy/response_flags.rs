//! Envoy's response flags as bits, the form of the `response.flags` property that filters read
//! (the access log writes the short names).

/// Envoy's short names in bit order: `LH` is bit 0 (`0x1`), `UH` bit 1 (`0x2`), and so on.
const NAMES: [&str; 29] = [
    "LH", "UH", "UT", "LR", "UR", "UF", "UC", "UO", "NR", "DI", "FI", "RL", "UAEX", "RLSE", "DC",
    "URX", "SI", "IH", "DPE", "UMSDR", "RFCF", "NFCF", "DT", "UPE", "NC", "OM", "DF", "DO", "DR",
];

/// The bits of comma-separated short names (`"UF,URX"` is `0x8020`); unknown names add none.
pub fn bits(flags: &str) -> u64 {
    if flags.is_empty() {
        return 0;
    }
    flags
        .split(',')
        .map(str::trim)
        .filter_map(|f| NAMES.iter().position(|n| *n == f))
        .fold(0, |acc, i| acc | 1 << i)
}

#[cfg(test)]
mod tests {
    use super::bits;

    #[test]
    fn short_names_become_envoys_bits() {
        assert_eq!(bits(""), 0);
        assert_eq!(bits("UH"), 0x2);
        assert_eq!(bits("UF,URX"), 0x20 | 0x8000);
        assert_eq!(bits("NR"), 0x100);
        assert_eq!(bits("DC"), 0x4000);
        assert_eq!(bits("DR"), 1 << 28);
        assert_eq!(bits("XX,RL"), 0x800, "unknown names add nothing");
    }
}
