//! Settings the dispatcher refuses before it touches anything: each with a message that
//! names the value and what would be accepted, and exit code 1.

use std::process::Command;

/// Runs `gantry-dispatcher` with `env` and no other configuration; its exit code and
/// standard error.
fn dispatcher_with(env: &[(&str, &str)]) -> anyhow::Result<(Option<i32>, String)> {
    let out = Command::new(gantry_tests::bin_path("gantry-dispatcher"))
        .env_remove("GANTRY_CONFIG")
        .envs(env.iter().copied())
        .output()?;
    Ok((out.status.code(), String::from_utf8(out.stderr)?))
}

#[test]
fn an_unknown_runtime_in_the_environment_is_refused_with_the_choices() -> anyhow::Result<()> {
    let (code, stderr) = dispatcher_with(&[("GANTRY_RUNTIME", "kubernetess")])?;
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains(
            r#"invalid configuration in GANTRY_RUNTIME: "kubernetess": unknown runtime "kubernetess"; use "local" or "kubernetes""#
        ),
        "{stderr}"
    );
    Ok(())
}

#[test]
fn an_unknown_runtime_in_the_file_is_refused_with_its_place() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let file = dir.path().join("gantry.yaml");
    std::fs::write(&file, "dispatcher:\n  runtime: docker\n")?;
    let (code, stderr) = dispatcher_with(&[("GANTRY_CONFIG", &file.display().to_string())])?;
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains("dispatcher.runtime: unknown variant `docker`, expected `local` or `kubernetes` at line 2"),
        "{stderr}"
    );
    Ok(())
}

#[test]
fn an_executor_ca_configmap_of_another_namespace_is_refused_with_what_to_give() -> anyhow::Result<()>
{
    let (code, stderr) =
        dispatcher_with(&[("GANTRY_EXECUTOR_CA_CONFIGMAP", "security/gantry-ca")])?;
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains("invalid configuration in dispatcher.kubernetes.executor_ca_configmap")
            && stderr.contains("give the NAME of one in the Jobs' namespace"),
        "{stderr}"
    );
    let (code, stderr) = dispatcher_with(&[("GANTRY_EXECUTOR_CA_CONFIGMAP", "Gantry_CA")])?;
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("is not NAME or NAMESPACE/NAME"), "{stderr}");
    Ok(())
}
