//! Workflows: the YAML files under `SWITCHBOARD_WORKFLOWS` that say what to
//! do when an event arrives. This module is the loader seam: it finds the
//! files and reports them; parsing, validation and matching build on it.

use std::path::{Path, PathBuf};

/// The workflow files found in a directory, in file-name order.
#[derive(Clone, Debug, Default)]
pub struct WorkflowSet {
    pub dir: PathBuf,
    pub files: Vec<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("cannot read workflow directory {dir}: {source}")]
    Io {
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl WorkflowSet {
    /// Lists `*.yaml` / `*.yml` in `dir` (not recursive). A missing directory is an empty set.
    pub fn load(dir: &Path) -> Result<Self, LoadError> {
        let entries = match std::fs::read_dir(dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Ok(Self {
                    dir: dir.to_owned(),
                    files: vec![],
                });
            }
            Err(source) => {
                return Err(LoadError::Io {
                    dir: dir.to_owned(),
                    source,
                });
            }
        };
        let mut files: Vec<PathBuf> = entries
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| {
                p.is_file()
                    && matches!(p.extension().and_then(|e| e.to_str()), Some("yaml" | "yml"))
            })
            .collect();
        files.sort();
        Ok(Self {
            dir: dir.to_owned(),
            files,
        })
    }
}
