//! strata-block: not built yet (see ARCHITECTURE.md for what it will own).
