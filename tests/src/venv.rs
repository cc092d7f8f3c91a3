//! The Python venvs of the real peers some tests run (a model server, the Celery client),
//! each made by a script of `scripts/` in `$HOME/.cache/gantry` and found once per test
//! process.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};

/// The Python of the venv that `script` (a path in the workspace) makes: `env_var` if set,
/// else the last line the script prints. Test processes that start together take turns:
/// one installs, the others then find the venv ready. `has` says what the venv holds, for
/// the error.
///
/// # Errors
/// The script fails (its output, on stderr, says why), or `HOME` is not set.
pub(crate) fn python_of(script: &str, env_var: &str, has: &str) -> Result<PathBuf> {
    if let Some(python) = std::env::var_os(env_var) {
        return Ok(PathBuf::from(python));
    }
    let script = workspace().join(script);
    let name = script
        .file_stem()
        .map_or_else(|| "venv".into(), |s| s.to_string_lossy().into_owned());
    let _turn = lock(&cache_dir()?.join(format!("{name}.lock")))?;
    let out = Command::new("bash")
        .arg(&script)
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("running {}", script.display()))?;
    if !out.status.success() {
        bail!(
            "{} failed ({}): see its output above, or set {env_var} to a Python that {has}",
            script.display(),
            out.status
        );
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let python = stdout
        .lines()
        .last()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .with_context(|| format!("{} printed no path to its Python", script.display()))?;
    Ok(PathBuf::from(python))
}

/// The workspace's root directory.
pub(crate) fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the tests crate is in the workspace")
        .to_path_buf()
}

/// `$HOME/.cache/gantry`, created if missing: where the venvs and the tiny model live.
pub(crate) fn cache_dir() -> Result<PathBuf> {
    let home = std::env::var_os("HOME").context(
        "HOME is not set: the test venvs and the tiny model live in $HOME/.cache/gantry",
    )?;
    let dir = Path::new(&home).join(".cache/gantry");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(dir)
}

/// An exclusive lock on `path`, held until the file is dropped.
pub(crate) fn lock(path: &Path) -> Result<File> {
    let file = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .with_context(|| format!("opening {}", path.display()))?;
    file.lock()
        .with_context(|| format!("locking {}", path.display()))?;
    Ok(file)
}
