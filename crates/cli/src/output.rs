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
