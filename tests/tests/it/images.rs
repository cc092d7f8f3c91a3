//! The image family of `docker/` and `scripts/build-images.sh`, as docs/docker.md describes
//! them: the executor base's exact pins (CUDA tag, vLLM) and labels, the executor built on the
//! base a build argument names, and the script's commands, read from its `--dry-run` (no
//! container engine runs here) or from stand-in `docker`/`podman` programs.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use anyhow::{Context, bail};
use gantry_dispatcher::settings::KubernetesSection;

const CUDA_TAG: &str = "12.8.0-cudnn-runtime-ubuntu24.04";
const VLLM: &str = "0.8.5";
const REGISTRY: &str = "reg.test/gantry";
const DIGEST: &str = "sha256:abababababababababababababababababababababababababababababababab";

fn workspace() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the tests crate sits in the workspace")
}

// ---------------------------------------------------------------------------------------
// Dockerfiles

/// One instruction of a Dockerfile: its keyword (upper case) and the rest of its line.
#[derive(Debug)]
struct Instruction {
    keyword: String,
    args: String,
}

/// The instructions of a Dockerfile, as the builder reads them: lines ending in `\` joined to
/// the next, comment and blank lines dropped (also inside a continued instruction).
fn instructions(text: &str) -> Vec<Instruction> {
    let mut found = Vec::new();
    let mut current = String::new();
    for line in text.lines() {
        let trimmed = line.trim();
        if trimmed.is_empty() || trimmed.starts_with('#') {
            continue;
        }
        match trimmed.strip_suffix('\\') {
            Some(part) => {
                current.push_str(part.trim());
                current.push(' ');
            }
            None => {
                current.push_str(trimmed);
                let (keyword, args) = current.split_once(' ').unwrap_or((current.as_str(), ""));
                found.push(Instruction {
                    keyword: keyword.to_ascii_uppercase(),
                    args: args.trim().to_owned(),
                });
                current.clear();
            }
        }
    }
    found
}

fn dockerfile(name: &str) -> anyhow::Result<Vec<Instruction>> {
    let path = workspace().join("docker").join(name);
    let text = std::fs::read_to_string(&path).with_context(|| format!("{}", path.display()))?;
    Ok(instructions(&text))
}

/// The `key=value` pairs of a LABEL or ENV instruction; a value may be in double quotes.
fn pairs(args: &str) -> anyhow::Result<BTreeMap<String, String>> {
    let mut found = BTreeMap::new();
    let mut rest = args.trim_start();
    while !rest.is_empty() {
        let Some((key, after)) = rest.split_once('=') else {
            bail!("no `=` in `{rest}` (of `{args}`)");
        };
        let (value, after) = match after.strip_prefix('"') {
            Some(quoted) => {
                let end = quoted
                    .find('"')
                    .with_context(|| format!("unclosed quote in `{args}`"))?;
                (&quoted[..end], &quoted[end + 1..])
            }
            None => after.split_at(after.find(char::is_whitespace).unwrap_or(after.len())),
        };
        found.insert(key.trim().to_owned(), value.to_owned());
        rest = after.trim_start();
    }
    Ok(found)
}

/// Every LABEL of `stage`, merged.
fn labels(stage: &[Instruction]) -> anyhow::Result<BTreeMap<String, String>> {
    let mut found = BTreeMap::new();
    for label in stage.iter().filter(|i| i.keyword == "LABEL") {
        found.extend(pairs(&label.args)?);
    }
    Ok(found)
}

/// The args of the instructions with `keyword`, in order.
fn all<'a>(stage: &'a [Instruction], keyword: &str) -> Vec<&'a str> {
    stage
        .iter()
        .filter(|i| i.keyword == keyword)
        .map(|i| i.args.as_str())
        .collect()
}

/// The instructions from the last FROM on: what the image is made of.
fn final_stage(file: &[Instruction]) -> &[Instruction] {
    let from = file.iter().rposition(|i| i.keyword == "FROM").unwrap_or(0);
    &file[from..]
}

/// The user executor pods run as, which the images must also be.
fn pod_user() -> String {
    let uid = KubernetesSection::default().run_as_user;
    format!("{uid}:{uid}")
}

/// The members of the workspace, from the root Cargo.toml's `members = [...]`.
fn workspace_members() -> anyhow::Result<Vec<String>> {
    let manifest = std::fs::read_to_string(workspace().join("Cargo.toml"))?;
    let list = manifest
        .split_once("members")
        .and_then(|(_, rest)| rest.split_once('['))
        .and_then(|(_, rest)| rest.split_once(']'))
        .map(|(list, _)| list)
        .context("no `members = [...]` in Cargo.toml")?;
    Ok(list
        .split(',')
        .map(|m| m.trim().trim_matches('"').to_owned())
        .filter(|m| !m.is_empty())
        .collect())
}

#[test]
fn the_base_is_the_exact_cuda_image_with_exactly_vllm_0_8_5_in_a_venv_first_on_path()
-> anyhow::Result<()> {
    let base = dockerfile("Dockerfile.executor-base")?;
    assert_eq!(
        all(&base, "FROM"),
        [format!("nvidia/cuda:{CUDA_TAG}").as_str()],
        "one stage, FROM the exact CUDA tag (a moving tag would change the bits under a \
         rebuild of the same revision)"
    );

    let runs = all(&base, "RUN");
    let install = runs
        .iter()
        .position(|r| r.contains("pip install"))
        .context("no RUN … pip install")?;
    assert!(
        runs[install].contains("-m venv /opt/venv"),
        "the venv is /opt/venv: {}",
        runs[install]
    );
    let pins: Vec<&str> = runs[install]
        .split_whitespace()
        .filter(|w| w.trim_matches(['"', '\'']).starts_with("vllm"))
        .collect();
    assert_eq!(
        pins,
        [format!("vllm=={VLLM}").as_str()],
        "vLLM pinned exactly"
    );

    // The import check comes after the install, so a base that cannot import fails its build.
    let import = runs
        .iter()
        .position(|r| r.contains("import torch") && r.contains("vllm"))
        .context("no RUN that imports torch and vllm")?;
    assert!(import > install, "the import check runs after the install");
    assert!(
        runs[import].contains("/opt/venv/bin/vllm"),
        "the check also finds the `vllm` command on PATH (the openai engine's default server): \
         {}",
        runs[import]
    );
    assert!(
        !runs[import].contains("|| true"),
        "the import check may not be allowed to fail: {}",
        runs[import]
    );

    let env = all(&base, "ENV")
        .into_iter()
        .map(pairs)
        .collect::<anyhow::Result<Vec<_>>>()?;
    let path = env
        .iter()
        .filter_map(|e| e.get("PATH"))
        .next_back()
        .context("no ENV PATH")?;
    assert!(
        path.starts_with("/opt/venv/bin:") && path.contains("${PATH}"),
        "/opt/venv/bin first on PATH, ahead of the CUDA image's own PATH: {path}"
    );

    assert_eq!(
        all(&base, "USER").last().copied(),
        Some(pod_user().as_str()),
        "the base ends as the numeric user of executor pods, not root"
    );

    let args = all(&base, "ARG");
    for arg in ["BUILD_TIME", "GIT_REVISION"] {
        assert!(
            args.iter().any(|a| a.split('=').next() == Some(arg)),
            "ARG {arg} in the stage (an ARG before FROM is not seen by LABEL)"
        );
    }
    let labels = labels(&base)?;
    let expected = [
        ("org.opencontainers.image.created", "${BUILD_TIME}"),
        ("org.opencontainers.image.revision", "${GIT_REVISION}"),
        ("dev.gantry.cuda", CUDA_TAG),
        ("dev.gantry.vllm", VLLM),
        ("dev.gantry.base.created", "${BUILD_TIME}"),
        ("dev.gantry.base.revision", "${GIT_REVISION}"),
    ];
    for (key, value) in expected {
        assert_eq!(
            labels.get(key).map(String::as_str),
            Some(value),
            "LABEL {key} (labels: {labels:?})"
        );
    }
    Ok(())
}

#[test]
fn the_executor_builds_its_binary_on_bookworm_then_runs_on_the_base_a_build_arg_names()
-> anyhow::Result<()> {
    let file = dockerfile("Dockerfile.executor")?;
    let first_from = file
        .iter()
        .position(|i| i.keyword == "FROM")
        .context("no FROM")?;
    let global_args = all(&file[..first_from], "ARG");
    assert!(
        global_args
            .iter()
            .any(|a| a.starts_with("EXECUTOR_BASE=") && a.ends_with("/executor-base:latest")),
        "ARG EXECUTOR_BASE=…/executor-base:latest before the first FROM: {global_args:?}"
    );

    let froms = all(&file, "FROM");
    assert_eq!(
        froms.first().copied(),
        Some("rust:1-bookworm AS build"),
        "the builder is Debian bookworm: glibc 2.36, older than Ubuntu 24.04's 2.39, so the \
         binary runs on the base"
    );
    let build = &file[first_from..file.len() - final_stage(&file).len()];
    assert!(
        all(build, "RUN").iter().any(|r| r
            .contains("cargo build --release --locked -p gantry-executor --bin gantry-executor")),
        "the builder stage builds gantry-executor"
    );
    let copies = all(build, "COPY");
    for member in workspace_members()? {
        assert!(
            copies.contains(&format!("{member} {member}").as_str()),
            "the builder copies the workspace member {member} (cargo reads every member's \
             manifest): COPY {member} {member}"
        );
    }

    let last = final_stage(&file);
    assert!(
        matches!(
            froms.last().copied(),
            Some("${EXECUTOR_BASE}" | "$EXECUTOR_BASE")
        ),
        "the image is FROM the base the build argument names: {froms:?}"
    );
    assert!(
        all(last, "ARG")
            .iter()
            .any(|a| a.starts_with("EXECUTOR_BASE")),
        "ARG EXECUTOR_BASE again in the final stage, for its label and error message"
    );
    let check = all(last, "RUN")
        .into_iter()
        .find(|r| r.contains("test -x /opt/venv/bin/python"))
        .context("no RUN test -x /opt/venv/bin/python in the final stage")?;
    assert!(
        check.contains("test -x /opt/venv/bin/vllm"),
        "the check also wants the `vllm` command of the openai engine: {check}"
    );
    assert!(
        check.contains("exit 1") && check.contains(">&2"),
        "a base without /opt/venv fails the build with a message: {check}"
    );
    assert!(
        all(last, "COPY").contains(
            &"--from=build /src/target/release/gantry-executor /usr/local/bin/gantry-executor"
        ),
        "the binary goes to /usr/local/bin"
    );
    assert_eq!(all(last, "USER").last().copied(), Some(pod_user().as_str()));
    assert_eq!(
        all(last, "ENTRYPOINT"),
        [r#"["/usr/local/bin/gantry-executor"]"#]
    );

    let labels = labels(last)?;
    for (key, value) in [
        ("org.opencontainers.image.created", "${BUILD_TIME}"),
        ("org.opencontainers.image.revision", "${GIT_REVISION}"),
        ("org.opencontainers.image.base.name", "${EXECUTOR_BASE}"),
    ] {
        assert_eq!(
            labels.get(key).map(String::as_str),
            Some(value),
            "LABEL {key}"
        );
    }
    // dev.gantry.base.* must come from the base, unchanged.
    assert!(
        !labels.keys().any(|k| k.starts_with("dev.gantry.")),
        "the executor does not override the base's dev.gantry.* labels: {labels:?}"
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------
// scripts/build-images.sh

/// `bash scripts/build-images.sh ARGS` from the workspace root, with the environment `env`
/// and none of the script's own variables inherited.
fn script(args: &[&str], env: &[(&str, &str)]) -> anyhow::Result<Output> {
    let mut command = Command::new("bash");
    command
        .arg("scripts/build-images.sh")
        .args(args)
        .current_dir(workspace())
        .env_remove("CONTAINER_ENGINE")
        .env_remove("GANTRY_IMAGE_REGISTRY");
    for (key, value) in env {
        command.env(key, value);
    }
    command.output().context("bash scripts/build-images.sh")
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// The words of a `+ ` line, as the shell reads them (words in single quotes kept whole).
fn words(line: &str) -> Vec<String> {
    let mut found = Vec::new();
    let mut word = String::new();
    let mut quoted = false;
    let mut in_word = false;
    for c in line.chars() {
        match c {
            '\'' => {
                quoted = !quoted;
                in_word = true;
            }
            c if c.is_whitespace() && !quoted => {
                if in_word {
                    found.push(std::mem::take(&mut word));
                }
                in_word = false;
            }
            c => {
                word.push(c);
                in_word = true;
            }
        }
    }
    if in_word {
        found.push(word);
    }
    found
}

/// The commands the script printed (its `+ ` lines), as words.
fn commands_of(output: &Output) -> Vec<Vec<String>> {
    stdout(output)
        .lines()
        .filter_map(|l| l.strip_prefix("+ "))
        .map(words)
        .collect()
}

/// The values of every `flag VALUE` in `command`.
fn values<'a>(command: &'a [String], flag: &str) -> Vec<&'a str> {
    command
        .windows(2)
        .filter(|w| w[0] == flag)
        .map(|w| w[1].as_str())
        .collect()
}

/// The index of the one command that builds with `docker/<dockerfile>`.
fn build_of(commands: &[Vec<String>], dockerfile: &str) -> Option<usize> {
    let path = format!("docker/{dockerfile}");
    commands
        .iter()
        .position(|c| c.get(1).map(String::as_str) == Some("build") && values(c, "-f") == [&path])
}

/// The index of the command that pushes `reference`.
fn push_of(commands: &[Vec<String>], reference: &str) -> Option<usize> {
    commands.iter().position(|c| {
        c.get(1).map(String::as_str) == Some("push") && c.last().is_some_and(|r| r == reference)
    })
}

fn git(args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new("git")
        .args(args)
        .current_dir(workspace())
        .output()?;
    if !out.status.success() {
        bail!("git {args:?}: {}", stderr(&out));
    }
    Ok(stdout(&out).trim().to_owned())
}

/// The commit the images were tagged with: the SHA tag of the first build (`-t …:<sha>`),
/// checked against `git rev-parse` now and before the script ran (others may commit in
/// between). Returns the short SHA and the full one.
fn tagged_commit(
    commands: &[Vec<String>],
    before: &[(String, String)],
) -> anyhow::Result<(String, String)> {
    let mut heads = before.to_vec();
    heads.push(head()?);
    let build = commands
        .iter()
        .find(|c| c.get(1).map(String::as_str) == Some("build"))
        .context("no build")?;
    let tags = values(build, "-t");
    for (short, full) in heads {
        if tags.iter().any(|t| t.ends_with(&format!(":{short}"))) {
            return Ok((short, full));
        }
    }
    bail!("no tag of {tags:?} is the SHA of HEAD (git rev-parse --short=12 HEAD)")
}

/// HEAD, short (12) and full.
fn head() -> anyhow::Result<(String, String)> {
    Ok((
        git(&["rev-parse", "--short=12", "HEAD"])?,
        git(&["rev-parse", "HEAD"])?,
    ))
}

#[test]
fn with_base_the_dry_run_builds_and_pushes_the_base_before_the_executor_built_on_its_sha()
-> anyhow::Result<()> {
    let before = head()?;
    let output = script(
        &["--dry-run", "--with-base", "--registry", REGISTRY],
        &[("CONTAINER_ENGINE", "docker")],
    )?;
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    let commands = commands_of(&output);
    let (sha, revision) = tagged_commit(&commands, &[before])?;
    assert_eq!(sha.len(), 12, "the SHA tag is 12 characters: {sha}");
    assert!(
        commands.iter().all(|c| c[0] == "docker"),
        "CONTAINER_ENGINE=docker: {commands:?}"
    );

    let image = |name: &str, tag: &str| format!("{REGISTRY}/{name}:{tag}");
    let dispatcher = build_of(&commands, "Dockerfile.dispatcher").context("no dispatcher build")?;
    let base = build_of(&commands, "Dockerfile.executor-base").context("no base build")?;
    let executor = build_of(&commands, "Dockerfile.executor").context("no executor build")?;
    let base_pushed =
        push_of(&commands, &image("executor-base", &sha)).context("base not pushed")?;
    let executor_pushed =
        push_of(&commands, &image("executor", &sha)).context("executor not pushed")?;
    assert!(
        dispatcher < base
            && base < base_pushed
            && base_pushed < executor
            && executor < executor_pushed,
        "order: dispatcher build, base build, base push, executor build, executor push: \
         {commands:#?}"
    );

    for (name, index, context) in [
        ("dispatcher", dispatcher, "."),
        ("executor-base", base, "docker"),
        ("executor", executor, "."),
    ] {
        let build = &commands[index];
        let mut tags = values(build, "-t");
        tags.sort_unstable();
        let mut expected = [image(name, "latest"), image(name, &sha)];
        expected.sort_unstable();
        assert_eq!(tags, expected, "{name}: tagged latest and the SHA");
        assert_eq!(
            build.last().map(String::as_str),
            Some(context),
            "{name}: build context"
        );
        for tag in ["latest", sha.as_str()] {
            let pushed = push_of(&commands, &image(name, tag))
                .with_context(|| format!("{name}:{tag} not pushed"))?;
            assert!(pushed > index, "{name}:{tag} pushed after its build");
            assert!(
                commands[pushed + 1..].iter().any(|c| c[1] == "inspect"
                    && c.last() == Some(&image(name, tag))
                    && c.iter().any(|w| w.contains(".RepoDigests"))),
                "{name}:{tag}: its digest is read after the push"
            );
        }
    }

    let build_args = values(&commands[executor], "--build-arg");
    let executor_base = format!("EXECUTOR_BASE={}", image("executor-base", &sha));
    assert!(
        build_args.contains(&executor_base.as_str()),
        "the executor builds on the base's SHA tag just pushed: {build_args:?}"
    );
    let revision_arg = format!("GIT_REVISION={revision}");
    for index in [base, executor] {
        let args = values(&commands[index], "--build-arg");
        assert!(args.contains(&revision_arg.as_str()), "{args:?}");
        assert!(
            args.iter().any(|a| a
                .strip_prefix("BUILD_TIME=")
                .is_some_and(|t| t.ends_with('Z'))),
            "BUILD_TIME in UTC: {args:?}"
        );
    }
    let labels = values(&commands[dispatcher], "--label");
    assert!(
        labels.contains(&format!("org.opencontainers.image.revision={revision}").as_str()),
        "the dispatcher gets its labels on the command line: {labels:?}"
    );
    assert!(
        !commands.iter().any(|c| c[1] == "pull"),
        "nothing to pull: the base is the one just built"
    );
    Ok(())
}

#[test]
fn without_with_base_no_base_is_built_and_the_executor_builds_on_an_existing_base_tag()
-> anyhow::Result<()> {
    let output = script(
        &["--dry-run", "--registry", REGISTRY],
        &[("CONTAINER_ENGINE", "docker")],
    )?;
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    let commands = commands_of(&output);
    assert!(
        !commands
            .iter()
            .any(|c| c.iter().any(|w| w.contains("Dockerfile.executor-base"))
                || (c[1] == "push" && c.iter().any(|w| w.contains("/executor-base:")))),
        "no base built or pushed without --with-base: {commands:#?}"
    );
    let executor = build_of(&commands, "Dockerfile.executor").context("no executor build")?;
    let latest = format!("{REGISTRY}/executor-base:latest");
    assert!(
        values(&commands[executor], "--build-arg")
            .contains(&format!("EXECUTOR_BASE={latest}").as_str()),
        "the executor builds on executor-base:latest by default: {:?}",
        commands[executor]
    );
    let pull = commands
        .iter()
        .position(|c| c[1] == "pull" && c.last() == Some(&latest))
        .context("the base is pulled, not taken from a stale local copy")?;
    assert!(pull < executor);
    assert!(build_of(&commands, "Dockerfile.dispatcher").is_some());

    // --base-tag: an older base, by its SHA tag.
    let output = script(
        &[
            "--dry-run",
            "--registry",
            REGISTRY,
            "--base-tag",
            "0123456789ab",
            "executor",
        ],
        &[],
    )?;
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    let commands = commands_of(&output);
    let executor = build_of(&commands, "Dockerfile.executor").context("no executor build")?;
    assert!(
        values(&commands[executor], "--build-arg")
            .contains(&format!("EXECUTOR_BASE={REGISTRY}/executor-base:0123456789ab").as_str())
    );
    assert_eq!(
        build_of(&commands, "Dockerfile.dispatcher"),
        None,
        "only the images named are built"
    );

    // --no-push: nothing pulled or pushed.
    let output = script(&["--dry-run", "--no-push"], &[])?;
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    let commands = commands_of(&output);
    assert_eq!(commands.len(), 2, "two builds only: {commands:#?}");
    assert!(commands.iter().all(|c| c[1] == "build"));
    Ok(())
}

/// A call with bad flags: its arguments, its environment, and the reason it must print.
type BadCall = (
    &'static [&'static str],
    &'static [(&'static str, &'static str)],
    &'static str,
);

#[test]
fn bad_flags_exit_2_with_the_reason_and_run_nothing() -> anyhow::Result<()> {
    let cases: [BadCall; 8] = [
        (&["--frobnicate"], &[], "unknown flag: --frobnicate"),
        (&["--registry"], &[], "--registry needs a value"),
        (&["--engine", "rkt"], &[], "docker or podman"),
        (&[], &[("CONTAINER_ENGINE", "rkt")], "CONTAINER_ENGINE"),
        (&["--with-base", "--base-tag", "abc"], &[], "--base-tag"),
        (&["--base-tag", "a/b"], &[], "not an image tag"),
        (&["dispatchr"], &[], "unknown image: dispatchr"),
        (&["--registry", "Reg.Test/X"], &[], "lowercase"),
    ];
    for (args, env, reason) in cases {
        let mut all = vec!["--dry-run"];
        all.extend_from_slice(args);
        let output = script(&all, env)?;
        assert_eq!(
            output.status.code(),
            Some(2),
            "{all:?} {env:?}: {}",
            stderr(&output)
        );
        let err = stderr(&output);
        assert!(
            err.contains(reason),
            "{all:?}: the reason `{reason}` in: {err}"
        );
        assert!(err.contains("--help"), "{all:?}: points to --help: {err}");
        assert!(commands_of(&output).is_empty(), "{all:?}: ran nothing");
    }

    let help = script(&["--help"], &[])?;
    assert_eq!(help.status.code(), Some(0));
    let text = stdout(&help);
    for flag in [
        "--with-base",
        "--base-tag",
        "--registry",
        "--engine",
        "--no-push",
        "--dry-run",
        "GANTRY_IMAGE_REGISTRY",
        "CONTAINER_ENGINE",
        "executor-base",
    ] {
        assert!(text.contains(flag), "--help teaches {flag}");
    }
    Ok(())
}

#[test]
fn engine_podman_prints_podman_commands_even_over_container_engine() -> anyhow::Result<()> {
    let output = script(
        &[
            "--engine",
            "podman",
            "--dry-run",
            "--with-base",
            "--registry",
            REGISTRY,
        ],
        &[("CONTAINER_ENGINE", "docker")],
    )?;
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    let commands = commands_of(&output);
    assert!(commands.len() > 6, "{commands:#?}");
    assert!(
        commands.iter().all(|c| c[0] == "podman"),
        "the flag wins over CONTAINER_ENGINE: {commands:#?}"
    );
    let pushes: Vec<_> = commands.iter().filter(|c| c[1] == "push").collect();
    assert_eq!(pushes.len(), 6, "three images, two tags each");
    assert!(
        pushes.iter().all(|c| values(c, "--digestfile").len() == 1),
        "podman writes the pushed digest to a file: {pushes:#?}"
    );
    Ok(())
}

/// A directory for stand-in programs, and `name` in it with the shell `script`.
fn program(dir: &Path, name: &str, script: &str) -> anyhow::Result<PathBuf> {
    let path = dir.join(name);
    std::fs::write(&path, format!("#!/bin/sh\n{script}\n"))?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))?;
    Ok(path)
}

/// `name` found on this process's PATH.
fn on_path(name: &str) -> anyhow::Result<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
        .with_context(|| format!("{name} not on PATH"))
}

#[test]
fn the_dry_run_needs_no_engine_installed() -> anyhow::Result<()> {
    // A PATH with only what the script needs besides an engine.
    let bin = tempfile::tempdir()?;
    for tool in ["git", "date"] {
        std::os::unix::fs::symlink(on_path(tool)?, bin.path().join(tool))?;
    }
    let output = Command::new(on_path("bash")?)
        .args(["scripts/build-images.sh", "--dry-run"])
        .current_dir(workspace())
        .env_clear()
        .env("PATH", bin.path())
        .output()?;
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    let commands = commands_of(&output);
    assert!(
        !commands.is_empty() && commands.iter().all(|c| c[0] == "docker"),
        "docker's commands when no engine is found: {commands:#?}"
    );
    Ok(())
}

#[test]
fn after_each_push_every_tag_is_printed_with_the_digest_of_its_repository() -> anyhow::Result<()> {
    let (sha, _) = head()?;
    let bin = tempfile::tempdir()?;
    // `docker inspect` lists the digest of another repository first: the script must pick
    // the one of the repository it pushed to.
    program(
        bin.path(),
        "docker",
        &format!(
            r#"if [ "$1" = inspect ]; then ref=$4; echo "elsewhere.test/x@sha256:{}"; echo "${{ref%:*}}@{DIGEST}"; fi"#,
            "1".repeat(64)
        ),
    )?;
    // `podman push --digestfile FILE REF` writes the digest to FILE.
    program(
        bin.path(),
        "podman",
        &format!(r#"if [ "$1" = push ]; then printf '%s' '{DIGEST}' > "$3"; fi"#),
    )?;
    let path = format!(
        "{}:{}",
        bin.path().display(),
        std::env::var("PATH").unwrap_or_default()
    );

    for engine in ["docker", "podman"] {
        let output = script(
            &["--engine", engine, "--registry", REGISTRY],
            &[("PATH", &path)],
        )?;
        assert_eq!(
            output.status.code(),
            Some(0),
            "{engine}: {}",
            stderr(&output)
        );
        let (sha, _) = tagged_commit(&commands_of(&output), &[(sha.clone(), String::new())])?;
        let text = stdout(&output);
        for name in ["dispatcher", "executor"] {
            for tag in [sha.as_str(), "latest"] {
                let line = format!("{REGISTRY}/{name}:{tag} {REGISTRY}/{name}@{DIGEST}");
                assert!(
                    text.lines().filter(|l| l.ends_with(&line)).count() == 2,
                    "{engine}: `{line}` printed after the push and in the summary: {text}"
                );
            }
        }
    }
    Ok(())
}

#[test]
fn a_base_that_fails_its_build_stops_the_script_before_any_executor_is_built() -> anyhow::Result<()>
{
    let bin = tempfile::tempdir()?;
    // Every command succeeds but the build of the base (as its failed import check would).
    program(
        bin.path(),
        "docker",
        r#"case "$*" in *Dockerfile.executor-base*) exit 17 ;; esac; if [ "$1" = inspect ]; then echo "${4%:*}@sha256:$(printf 'ab%.0s' $(seq 32))"; fi"#,
    )?;
    let path = format!(
        "{}:{}",
        bin.path().display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let output = script(
        &["--engine", "docker", "--with-base", "--registry", REGISTRY],
        &[("PATH", &path)],
    )?;
    assert_eq!(output.status.code(), Some(1), "{}", stderr(&output));
    assert!(
        stderr(&output).contains("docker build failed (exit 17)"),
        "the failed command is named: {}",
        stderr(&output)
    );
    let commands = commands_of(&output);
    let base = build_of(&commands, "Dockerfile.executor-base").context("no base build")?;
    assert_eq!(
        base,
        commands.len() - 1,
        "nothing runs after the failed base build: {commands:#?}"
    );
    Ok(())
}
