//! strata-rpc: not built yet (see ARCHITECTURE.md for what it will own).
