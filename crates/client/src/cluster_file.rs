use crate::ClientError;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// How clients find a cluster: its id and the management addresses of its access points.
/// Written by `strata up`; found by `--cluster FILE`, then `$STRATA_CLUSTER`, then
/// `~/.strata/cluster.json`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct ClusterFile {
    pub format: u8,
    pub cluster: String,
    pub access_points: Vec<String>,
}

impl ClusterFile {
    pub fn default_path() -> PathBuf {
        let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("/tmp"));
        home.join(".strata").join("cluster.json")
    }

    pub fn locate(explicit: Option<&Path>) -> Result<ClusterFile, ClientError> {
        let path = match explicit {
            Some(p) => p.to_owned(),
            None => std::env::var_os("STRATA_CLUSTER").map(PathBuf::from).unwrap_or_else(Self::default_path),
        };
        Self::load(&path)
    }

    pub fn load(path: &Path) -> Result<ClusterFile, ClientError> {
        let text = std::fs::read_to_string(path).map_err(|e| ClientError::ClusterFile(format!("{}: {e}; start a cluster with `strata up` or pass --cluster FILE", path.display())))?;
        let f: ClusterFile = serde_json::from_str(&text).map_err(|e| ClientError::ClusterFile(format!("{}: {e}", path.display())))?;
        if f.access_points.is_empty() {
            return Err(ClientError::ClusterFile(format!("{} lists no access points", path.display())));
        }
        Ok(f)
    }

    pub fn save(&self, path: &Path) -> Result<(), ClientError> {
        if let Some(d) = path.parent() {
            std::fs::create_dir_all(d).map_err(|e| ClientError::ClusterFile(format!("{}: {e}", d.display())))?;
        }
        let tmp = path.with_extension("tmp");
        let text = serde_json::to_string_pretty(self).map_err(|e| ClientError::ClusterFile(e.to_string()))?;
        std::fs::write(&tmp, text).and_then(|()| std::fs::rename(&tmp, path)).map_err(|e| ClientError::ClusterFile(format!("{}: {e}", path.display())))
    }
}
