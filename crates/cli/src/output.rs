//! Human or JSON output, chosen by `--json` on every command.

use serde::Serialize;

/// Print `value` as pretty JSON when `json` is set, otherwise call `human` to print it.
pub fn emit<T: Serialize>(json: bool, value: &T, human: impl FnOnce(&T)) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(value)?);
    } else {
        human(value);
    }
    Ok(())
}

/// Parse a size like `4096`, `512K`, `10G`, `1.5T` (binary units; `B`, `iB` suffixes allowed).
pub fn parse_size(s: &str) -> anyhow::Result<u64> {
    let t = s.trim().trim_end_matches(['b', 'B']).trim_end_matches('i');
    let (num, mult) = match t.chars().last() {
        Some('k' | 'K') => (&t[..t.len() - 1], 1u64 << 10),
        Some('m' | 'M') => (&t[..t.len() - 1], 1 << 20),
        Some('g' | 'G') => (&t[..t.len() - 1], 1 << 30),
        Some('t' | 'T') => (&t[..t.len() - 1], 1 << 40),
        Some('p' | 'P') => (&t[..t.len() - 1], 1 << 50),
        _ => (t, 1),
    };
    let v: f64 = num.trim().parse().map_err(|_| anyhow::anyhow!("'{s}' is not a size; use e.g. 4096, 512K, 10G, 1T"))?;
    anyhow::ensure!(v >= 0.0 && v.is_finite(), "'{s}' is not a size");
    Ok((v * mult as f64) as u64)
}

pub use strata_types::human_bytes;
