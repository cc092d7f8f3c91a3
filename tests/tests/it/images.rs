//! The image family of `docker/`, `scripts/build-images.sh` and the Makefile's image
//! targets, as docs/docker.md describes them: the executor base's exact pins (CUDA tag,
//! vLLM) and labels, the executor built on the base a build argument names, the dispatcher's
//! and the registry's small images with their health checks, dependencies compiled in a
//! layer of their own, the trimmed build context, and the commands of the script and of
//! `make`, read from their dry runs (no container engine runs here) or from stand-in
//! `docker`/`podman` programs; and the health probe commands the images run.

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
/// A stand-in engine's answer to `image inspect --format {{.Size}}`: 42 MB.
const SMALL: &str = r#"if [ "$1 $2" = "image inspect" ]; then echo 42000000; fi"#;

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
    assert!(
        froms[..froms.len() - 1]
            .iter()
            .all(|f| f.starts_with("rust:1-bookworm AS ")),
        "the builder is Debian bookworm: glibc 2.36, older than Ubuntu 24.04's 2.39, so the \
         binary runs on the base: {froms:?}"
    );
    assert_dependencies_in_their_own_layer(&file, "gantry-executor")?;

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

/// The stages of a Dockerfile, each from its FROM on.
fn stages(file: &[Instruction]) -> Vec<&[Instruction]> {
    let starts: Vec<usize> = file
        .iter()
        .enumerate()
        .filter(|(_, i)| i.keyword == "FROM")
        .map(|(n, _)| n)
        .collect();
    starts
        .iter()
        .enumerate()
        .map(|(k, &start)| &file[start..starts.get(k + 1).copied().unwrap_or(file.len())])
        .collect()
}

/// The stage named `name` (`FROM … AS name`).
fn stage<'a>(file: &'a [Instruction], name: &str) -> anyhow::Result<&'a [Instruction]> {
    stages(file)
        .into_iter()
        .find(|s| s[0].args.ends_with(&format!(" AS {name}")))
        .with_context(|| format!("no stage `AS {name}`"))
}

/// The dependencies of `package` are compiled from the workspace's skeleton (manifests and
/// stubs, docker/rust-skeleton.sh) before the sources are copied, and the sources are then
/// touched so that cargo rebuilds the workspace's crates over their stubs.
fn assert_dependencies_in_their_own_layer(
    file: &[Instruction],
    package: &str,
) -> anyhow::Result<()> {
    let skeleton = stage(file, "skeleton")?;
    assert_eq!(skeleton[0].args, "rust:1-bookworm AS skeleton");
    assert!(
        all(skeleton, "COPY").contains(&"docker/rust-skeleton.sh /usr/local/bin/rust-skeleton"),
        "the skeleton stage has the script"
    );
    assert_eq!(all(skeleton, "RUN"), ["rust-skeleton"]);

    let build = stage(file, "build")?;
    assert_eq!(build[0].args, "rust:1-bookworm AS build");
    let cargo = format!("cargo build --release --locked -p {package} --bin {package}");
    let at = |pred: &dyn Fn(&Instruction) -> bool, what: &str| {
        build
            .iter()
            .position(pred)
            .with_context(|| format!("{package}: no {what} in the build stage"))
    };
    let no_debug_info = at(
        &|i| i.keyword == "ENV" && i.args == "CARGO_PROFILE_RELEASE_DEBUG=0",
        "ENV CARGO_PROFILE_RELEASE_DEBUG=0 (line tables would make the binary 4 times as large)",
    )?;
    let skeleton_copied = at(
        &|i| i.keyword == "COPY" && i.args == "--from=skeleton /src ./",
        "COPY --from=skeleton /src ./",
    )?;
    let deps = at(
        &|i| i.keyword == "RUN" && i.args == cargo,
        "RUN of cargo alone",
    )?;
    let sources = at(&|i| i.keyword == "COPY" && i.args == ". .", "COPY . .")?;
    let rebuilt = at(
        &|i| i.keyword == "RUN" && i.args.ends_with(&cargo) && i.args.contains("touch"),
        "RUN that touches the sources, then cargo",
    )?;
    assert!(
        no_debug_info < deps && skeleton_copied < deps && deps < sources && sources < rebuilt,
        "{package}: skeleton, dependencies, sources, then the build"
    );
    assert_eq!(
        all(build, "COPY").len(),
        2,
        "{package}: nothing else is copied into the build stage"
    );
    Ok(())
}

/// A service image: built on bookworm, run on distroless Debian 12 as 65532, its binary the
/// entrypoint and its own probe the HEALTHCHECK, in exec form (the image has no shell).
fn assert_service_image(
    dockerfile: &str,
    binary: &str,
    probe: &str,
    port: u16,
) -> anyhow::Result<()> {
    let file = self::dockerfile(dockerfile)?;
    let first_from = file.iter().position(|i| i.keyword == "FROM").unwrap_or(0);
    assert_eq!(
        all(&file[..first_from], "ARG"),
        ["RUNTIME_BASE=gcr.io/distroless/cc-debian12:nonroot"],
        "{dockerfile}: Debian 12, the glibc of the bookworm builder, with no shell"
    );
    assert_dependencies_in_their_own_layer(&file, binary)?;
    let last = final_stage(&file);
    assert_eq!(last[0].args, "${RUNTIME_BASE}", "{dockerfile}");
    assert_eq!(
        all(last, "COPY"),
        [format!("--from=build /src/target/release/{binary} /usr/local/bin/{binary}").as_str()],
        "{dockerfile}: only the binary is in the image"
    );
    assert_eq!(all(last, "USER"), [pod_user().as_str()], "{dockerfile}");
    assert_eq!(
        all(last, "ENTRYPOINT"),
        [format!(r#"["/usr/local/bin/{binary}"]"#).as_str()]
    );
    assert_eq!(
        all(last, "EXPOSE"),
        [port.to_string().as_str()],
        "{dockerfile}"
    );
    let health = all(last, "HEALTHCHECK");
    assert_eq!(health.len(), 1, "{dockerfile}: one HEALTHCHECK");
    let (options, command) = health[0]
        .split_once(" CMD ")
        .context("HEALTHCHECK … CMD …")?;
    assert_eq!(
        command,
        format!(r#"["/usr/local/bin/{binary}", "{probe}"]"#),
        "{dockerfile}: the binary probes itself, in exec form (no shell, no curl)"
    );
    for option in ["--interval=", "--timeout=", "--start-period=", "--retries="] {
        assert!(
            options.contains(option),
            "{dockerfile}: HEALTHCHECK {option}: {options}"
        );
    }
    let labels = labels(last)?;
    assert_eq!(
        labels
            .get("org.opencontainers.image.title")
            .map(String::as_str),
        Some(binary)
    );
    Ok(())
}

#[test]
fn the_dispatcher_and_registry_images_are_distroless_with_their_own_probe_as_health_check()
-> anyhow::Result<()> {
    assert_service_image("Dockerfile.dispatcher", "gantry-dispatcher", "probe", 8380)?;
    assert_service_image("Dockerfile.registry", "gantry-registry", "--probe", 8080)?;

    // The image serves its probes where the HEALTHCHECK and the kubelet reach them.
    let env = all(final_stage(&dockerfile("Dockerfile.dispatcher")?), "ENV")
        .into_iter()
        .map(pairs)
        .collect::<anyhow::Result<Vec<_>>>()?;
    assert!(
        env.iter()
            .any(|e| e.get("GANTRY_HTTP_ADDR").map(String::as_str) == Some("0.0.0.0:8380")),
        "the dispatcher image sets GANTRY_HTTP_ADDR=0.0.0.0:8380 (the binary's default is \
         loopback only): {env:?}"
    );
    Ok(())
}

#[test]
fn the_build_context_is_the_workspace_sources_only() -> anyhow::Result<()> {
    let text = std::fs::read_to_string(workspace().join(".dockerignore"))?;
    let lines: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect();
    assert_eq!(lines.first(), Some(&"*"), "everything is left out first");
    let mut let_in: Vec<String> = lines
        .iter()
        .filter_map(|l| l.strip_prefix('!'))
        .map(str::to_owned)
        .collect();
    let mut expected = vec![
        "Cargo.toml".to_owned(),
        "Cargo.lock".to_owned(),
        "docker/rust-skeleton.sh".to_owned(),
    ];
    expected.extend(workspace_members()?.into_iter().map(|m| format!("{m}/")));
    let_in.sort_unstable();
    expected.sort_unstable();
    assert_eq!(
        let_in, expected,
        "exactly the manifests, the skeleton script and every workspace member are let in"
    );
    for left_out in ["tests/tests/", "**/target/"] {
        assert!(lines.contains(&left_out), "{left_out} is left out");
    }
    // BuildKit reads <Dockerfile>.dockerignore instead of .dockerignore: none may exist.
    for entry in std::fs::read_dir(workspace().join("docker"))? {
        let name = entry?.file_name();
        let name = name.to_string_lossy();
        assert!(
            !name.ends_with(".dockerignore"),
            "docker/{name} would replace .dockerignore for its Dockerfile"
        );
    }
    Ok(())
}

#[test]
fn the_skeleton_keeps_the_manifests_and_stubs_every_source_and_cargo_still_reads_it()
-> anyhow::Result<()> {
    // What the build context holds of each member: its manifest and its sources.
    let mut files = vec![PathBuf::from("Cargo.toml"), PathBuf::from("Cargo.lock")];
    for member in workspace_members()? {
        let listed = git(&[
            "ls-files",
            "--",
            &format!("{member}/Cargo.toml"),
            &format!("{member}/src"),
        ])?;
        files.extend(listed.lines().map(PathBuf::from));
    }
    let dir = tempfile::tempdir()?;
    for file in &files {
        let target = dir.path().join(file);
        if let Some(parent) = target.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::copy(workspace().join(file), &target)
            .with_context(|| format!("copying {}", file.display()))?;
    }
    std::fs::write(dir.path().join("README.md"), "not kept")?;
    let out = Command::new("sh")
        .arg(workspace().join("docker/rust-skeleton.sh"))
        .current_dir(dir.path())
        .output()?;
    assert!(out.status.success(), "{}", stderr(&out));

    assert!(
        !dir.path().join("README.md").exists(),
        "other files are removed"
    );
    let manifest = std::fs::read_to_string(dir.path().join("dispatcher/Cargo.toml"))?;
    assert_eq!(
        manifest,
        std::fs::read_to_string(workspace().join("dispatcher/Cargo.toml"))?,
        "manifests are kept as they are"
    );
    let mut stubs = 0;
    for file in files
        .iter()
        .filter(|f| f.extension().is_some_and(|e| e == "rs"))
    {
        assert_eq!(
            std::fs::read_to_string(dir.path().join(file))?,
            "fn main() {}\n",
            "{}",
            file.display()
        );
        stubs += 1;
    }
    assert!(stubs > 50, "every source is a stub: {stubs}");
    // The workspace still loads, with the lock file as it is (--locked), without the tests.
    let out = Command::new(env!("CARGO"))
        .args([
            "metadata",
            "--locked",
            "--offline",
            "--no-deps",
            "--format-version",
            "1",
        ])
        .current_dir(dir.path())
        .output()?;
    assert!(out.status.success(), "cargo metadata: {}", stderr(&out));
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

/// The commands of a `--dry-run` with `args` and the environment `env`, which must succeed.
fn dry_run(args: &[&str], env: &[(&str, &str)]) -> anyhow::Result<Vec<Vec<String>>> {
    let mut all = vec!["--dry-run"];
    all.extend_from_slice(args);
    let output = script(&all, env)?;
    anyhow::ensure!(
        output.status.code() == Some(0),
        "{all:?}: {}",
        stderr(&output)
    );
    Ok(commands_of(&output))
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
    let registry = build_of(&commands, "Dockerfile.registry").context("no registry build")?;
    let base = build_of(&commands, "Dockerfile.executor-base").context("no base build")?;
    let executor = build_of(&commands, "Dockerfile.executor").context("no executor build")?;
    let base_pushed =
        push_of(&commands, &image("executor-base", &sha)).context("base not pushed")?;
    let executor_pushed =
        push_of(&commands, &image("executor", &sha)).context("executor not pushed")?;
    assert!(
        dispatcher < registry
            && registry < base
            && base < base_pushed
            && base_pushed < executor
            && executor < executor_pushed,
        "order: dispatcher, registry, base build, base push, executor build, executor push: \
         {commands:#?}"
    );

    for (name, index, context) in [
        ("dispatcher", dispatcher, "."),
        ("registry", registry, "."),
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
    for index in [dispatcher, registry] {
        let labels = values(&commands[index], "--label");
        assert!(
            labels.contains(&format!("org.opencontainers.image.revision={revision}").as_str()),
            "the dispatcher and the registry get their labels on the command line: {labels:?}"
        );
    }
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

    // --no-push: nothing pulled or pushed; the two service images' sizes are checked.
    let output = script(&["--dry-run", "--no-push"], &[])?;
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    let commands = commands_of(&output);
    let builds = commands.iter().filter(|c| c[1] == "build").count();
    assert_eq!(builds, 3, "dispatcher, registry, executor: {commands:#?}");
    assert!(
        commands
            .iter()
            .all(|c| c[1] == "build" || c[1..3] == ["image", "inspect"]),
        "{commands:#?}"
    );
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
    let cases: [BadCall; 12] = [
        (&["--frobnicate"], &[], "unknown flag: --frobnicate"),
        (&["--registry"], &[], "--registry needs a value"),
        (&["--engine", "rkt"], &[], "docker or podman"),
        (&[], &[("CONTAINER_ENGINE", "rkt")], "CONTAINER_ENGINE"),
        (&["--with-base", "--base-tag", "abc"], &[], "--base-tag"),
        (&["--base-tag", "a/b"], &[], "not an image tag"),
        (&["dispatchr"], &[], "unknown image: dispatchr"),
        (&["--registry", "Reg.Test/X"], &[], "lowercase"),
        (&["--tag", "v1/2"], &[], "--tag 'v1/2' is not an image tag"),
        (
            &["--max-size", "0"],
            &[],
            "--max-size '0' is not a size in MB",
        ),
        (&["--platform", "linux amd64"], &[], "comma-separated list"),
        // The executor images are amd64 only.
        (
            &["--platform", "linux/amd64,linux/arm64", "executor"],
            &[],
            "dispatcher and the registry only",
        ),
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
        "--tag",
        "--platform",
        "--max-size",
        "registry",
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
    assert_eq!(pushes.len(), 8, "four images, two tags each");
    assert!(
        commands
            .iter()
            .filter(|c| c[1] == "build")
            .all(|c| values(c, "--format") == ["docker"]),
        "podman builds in docker format, the one that keeps HEALTHCHECK: {commands:#?}"
    );
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
            r#"if [ "$1" = inspect ]; then ref=$4; echo "elsewhere.test/x@sha256:{}"; echo "${{ref%:*}}@{DIGEST}"; fi; {SMALL}"#,
            "1".repeat(64)
        ),
    )?;
    // `podman push --digestfile FILE REF` writes the digest to FILE.
    program(
        bin.path(),
        "podman",
        &format!(r#"if [ "$1" = push ]; then printf '%s' '{DIGEST}' > "$3"; fi; {SMALL}"#),
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
        for name in ["dispatcher", "registry", "executor"] {
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
        &format!(
            r#"case "$*" in *Dockerfile.executor-base*) exit 17 ;; esac; if [ "$1" = inspect ]; then echo "${{4%:*}}@sha256:$(printf 'ab%.0s' $(seq 32))"; fi; {SMALL}"#
        ),
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

#[test]
fn a_tag_replaces_latest_and_the_sha_and_the_executor_builds_on_the_base_of_that_tag()
-> anyhow::Result<()> {
    let commands = dry_run(
        &["--registry", REGISTRY, "--tag", "1.4.0", "--with-base"],
        &[("CONTAINER_ENGINE", "docker")],
    )?;
    for name in ["dispatcher", "registry", "executor-base", "executor"] {
        let dockerfile = match name {
            "executor-base" => "Dockerfile.executor-base".to_owned(),
            other => format!("Dockerfile.{other}"),
        };
        let build = build_of(&commands, &dockerfile).with_context(|| format!("no {name} build"))?;
        assert_eq!(
            values(&commands[build], "-t"),
            [format!("{REGISTRY}/{name}:1.4.0").as_str()],
            "{name}: the one tag"
        );
    }
    let pushed: Vec<&str> = commands
        .iter()
        .filter(|c| c[1] == "push")
        .filter_map(|c| c.last().map(String::as_str))
        .collect();
    assert!(
        pushed.iter().all(|r| r.ends_with(":1.4.0")) && pushed.len() == 4,
        "{pushed:?}"
    );
    let executor = build_of(&commands, "Dockerfile.executor").context("no executor build")?;
    assert!(
        values(&commands[executor], "--build-arg")
            .contains(&format!("EXECUTOR_BASE={REGISTRY}/executor-base:1.4.0").as_str())
    );
    Ok(())
}

#[test]
fn a_service_image_over_its_size_budget_fails_the_build_before_it_is_pushed() -> anyhow::Result<()>
{
    let bin = tempfile::tempdir()?;
    let path = |size: u64| -> anyhow::Result<String> {
        program(
            bin.path(),
            "docker",
            &format!(
                r#"if [ "$1 $2" = "image inspect" ]; then echo {size}; fi; if [ "$1" = inspect ]; then echo "${{4%:*}}@{DIGEST}"; fi"#
            ),
        )?;
        Ok(format!(
            "{}:{}",
            bin.path().display(),
            std::env::var("PATH").unwrap_or_default()
        ))
    };
    let args = [
        "--engine",
        "docker",
        "--registry",
        REGISTRY,
        "--tag",
        "dev-local",
        "dispatcher",
    ];

    let output = script(&args, &[("PATH", &path(100_000_001)?)])?;
    assert_eq!(output.status.code(), Some(1), "{}", stdout(&output));
    let err = stderr(&output);
    assert!(
        err.contains(&format!(
            "{REGISTRY}/dispatcher:dev-local is 100 MB, over its budget of 100 MB"
        )),
        "{err}"
    );
    assert!(
        !commands_of(&output).iter().any(|c| c[1] == "push"),
        "nothing is pushed"
    );

    let output = script(&args, &[("PATH", &path(61_500_000)?)])?;
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    assert!(
        stdout(&output).contains(&format!(
            "size {REGISTRY}/dispatcher:dev-local 62 MB (budget 100 MB)"
        )),
        "{}",
        stdout(&output)
    );

    // --max-size moves the budget.
    let mut tight = args.to_vec();
    tight.extend(["--max-size", "60"]);
    let output = script(&tight, &[("PATH", &path(61_500_000)?)])?;
    assert_eq!(output.status.code(), Some(1), "{}", stdout(&output));
    assert!(stderr(&output).contains("over its budget of 60 MB"));
    Ok(())
}

#[test]
fn platforms_build_the_service_images_for_both_architectures_at_once() -> anyhow::Result<()> {
    let both = "linux/amd64,linux/arm64";
    // docker: buildx, pushed as one index whose digest buildx writes.
    let docker = [("CONTAINER_ENGINE", "docker")];
    let commands = dry_run(
        &["--registry", REGISTRY, "--tag", "1.4.0", "--platform", both],
        &docker,
    )?;
    assert_eq!(
        commands.len(),
        2,
        "dispatcher and registry only: {commands:#?}"
    );
    for (command, name) in commands.iter().zip(["dispatcher", "registry"]) {
        assert_eq!(command[..3], ["docker", "buildx", "build"], "{command:?}");
        assert_eq!(values(command, "--platform"), [both]);
        assert_eq!(
            values(command, "-f"),
            [format!("docker/Dockerfile.{name}").as_str()]
        );
        assert_eq!(
            values(command, "-t"),
            [format!("{REGISTRY}/{name}:1.4.0").as_str()]
        );
        assert!(command.contains(&"--push".to_owned()), "{command:?}");
        assert_eq!(
            values(command, "--metadata-file"),
            [format!("target/image-digests/{name}.json").as_str()]
        );
        assert_eq!(command.last().map(String::as_str), Some("."));
    }

    // Not pushed: an OCI archive of both platforms (docker cannot load one).
    let not_pushed = ["--no-push", "--tag", "dev-local", "--platform", both];
    let commands = dry_run(&[&not_pushed[..], &["registry"]].concat(), &docker)?;
    assert_eq!(commands.len(), 1, "{commands:#?}");
    assert_eq!(
        values(&commands[0], "--output"),
        ["type=oci,dest=target/images/registry-dev-local.oci.tar"]
    );

    // podman: one manifest list, pushed with all its images.
    let podman = ["--engine", "podman", "--tag", "1.4.0", "--platform", both];
    let commands = dry_run(&[&podman[..], &["dispatcher"]].concat(), &[])?;
    assert_eq!(commands.len(), 2, "{commands:#?}");
    assert_eq!(commands[0][..2], ["podman", "build"]);
    assert_eq!(values(&commands[0], "--platform"), [both]);
    assert_eq!(values(&commands[0], "--format"), ["docker"]);
    let list = "registry.example.com/gantry/dispatcher:1.4.0";
    assert_eq!(values(&commands[0], "--manifest"), [list]);
    assert_eq!(
        commands[1][..5],
        ["podman", "manifest", "push", "--all", "--digestfile"]
    );
    assert_eq!(
        commands[1][6..],
        [list.to_owned(), format!("docker://{list}")]
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------
// The Makefile's image targets

const IMAGE_TARGETS: [&str; 10] = [
    "build-image",
    "push-image",
    "build-multiarch",
    "push-multiarch",
    "run-local",
    "test-image",
    "logs",
    "stop",
    "clean",
    "help",
];

/// `make ARGS` in the workspace with a PATH of `path` (this process's when `None`) and none
/// of the image settings inherited.
fn make(args: &[&str], path: Option<&str>) -> anyhow::Result<Output> {
    let mut command = Command::new(on_path("make")?);
    command
        .args(["--no-print-directory"])
        .args(args)
        .current_dir(workspace());
    for setting in [
        "IMAGE",
        "VERSION",
        "IMAGE_REPOSITORY",
        "GANTRY_IMAGE_REGISTRY",
        "PLATFORMS",
        "CONTAINER_ENGINE",
        "IMAGES_ARGS",
        "MAKEFLAGS",
    ] {
        command.env_remove(setting);
    }
    if let Some(path) = path {
        command.env("PATH", path);
    }
    command.output().context("make")
}

/// The lines `make -n ARGS` prints.
fn make_n(args: &[&str]) -> anyhow::Result<Vec<String>> {
    let output = make(&[&["-n"], args].concat(), None)?;
    anyhow::ensure!(
        output.status.success(),
        "make -n {args:?}: {}",
        stderr(&output)
    );
    // A recipe line continued with `\` is one command.
    Ok(stdout(&output)
        .replace("\\\n", " ")
        .lines()
        .map(str::to_owned)
        .collect())
}

#[test]
fn make_help_lists_every_image_target_and_its_settings() -> anyhow::Result<()> {
    let output = make(&["help"], None)?;
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    let text = stdout(&output);
    let listed: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("  "))
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    for target in IMAGE_TARGETS.iter().chain(&["images", "test"]) {
        assert!(listed.contains(target), "make help lists {target}:\n{text}");
    }
    for setting in [
        "IMAGE=dispatcher",
        "VERSION=dev-local",
        "IMAGE_REPOSITORY=registry.example.com/gantry",
        "PLATFORMS=linux/amd64,linux/arm64",
        "CONTAINER_ENGINE=",
    ] {
        assert!(text.contains(setting), "make help shows {setting}:\n{text}");
    }
    // `help` is the default goal.
    let output = make(&[], None)?;
    assert_eq!(stdout(&output), text);
    Ok(())
}

#[test]
fn the_build_targets_run_the_script_with_the_version_and_repository() -> anyhow::Result<()> {
    let script_line = |lines: &[String]| -> anyhow::Result<Vec<String>> {
        let line = lines
            .iter()
            .find(|l| l.starts_with("bash scripts/build-images.sh"))
            .with_context(|| format!("no script run in {lines:#?}"))?;
        Ok(words(line))
    };
    let build = script_line(&make_n(&["build-image", "CONTAINER_ENGINE=docker"])?)?;
    assert_eq!(
        values(&build, "--tag"),
        ["dev-local"],
        "VERSION defaults to dev-local"
    );
    assert_eq!(
        values(&build, "--registry"),
        ["registry.example.com/gantry"]
    );
    assert_eq!(values(&build, "--engine"), ["docker"]);
    assert!(build.contains(&"--no-push".to_owned()));
    assert_eq!(build.last().map(String::as_str), Some("dispatcher"));

    let push = script_line(&make_n(&[
        "push-image",
        "IMAGE=registry",
        "VERSION=1.4.0",
        &format!("IMAGE_REPOSITORY={REGISTRY}"),
    ])?)?;
    assert_eq!(values(&push, "--tag"), ["1.4.0"]);
    assert_eq!(values(&push, "--registry"), [REGISTRY]);
    assert!(!push.contains(&"--no-push".to_owned()));
    assert_eq!(push.last().map(String::as_str), Some("registry"));

    let multi = script_line(&make_n(&["build-multiarch"])?)?;
    assert_eq!(values(&multi, "--platform"), ["linux/amd64,linux/arm64"]);
    assert!(multi.contains(&"--no-push".to_owned()));
    let multi = script_line(&make_n(&["push-multiarch", "PLATFORMS=linux/arm64"])?)?;
    assert_eq!(values(&multi, "--platform"), ["linux/arm64"]);
    assert!(!multi.contains(&"--no-push".to_owned()));

    // The script's own dry run through make: the build and the size check it would run.
    let output = make(
        &[
            "build-image",
            "CONTAINER_ENGINE=docker",
            "IMAGES_ARGS=--dry-run",
        ],
        None,
    )?;
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    let commands = commands_of(&output);
    let reference = "registry.example.com/gantry/dispatcher:dev-local";
    let built = build_of(&commands, "Dockerfile.dispatcher").context("no build")?;
    assert_eq!(values(&commands[built], "-t"), [reference]);
    assert!(
        commands[built + 1..]
            .iter()
            .any(|c| c[1..3] == ["image", "inspect"]
                && c.last().map(String::as_str) == Some(reference)),
        "the size is checked after the build: {commands:#?}"
    );

    // Only the service images are built by VERSION.
    let output = make(&["build-image", "IMAGE=executor"], None)?;
    assert_eq!(output.status.code(), Some(2), "{}", stdout(&output));
    assert!(
        stderr(&output).contains("IMAGE=executor"),
        "{}",
        stderr(&output)
    );
    Ok(())
}

#[test]
fn the_container_targets_run_logs_stop_and_clean_the_one_local_container() -> anyhow::Result<()> {
    let reference = format!("{REGISTRY}/registry:1.4.0");
    let settings = ["IMAGE=registry", "VERSION=1.4.0", "CONTAINER_ENGINE=podman"];
    let repository = format!("IMAGE_REPOSITORY={REGISTRY}");
    let with = |target: &'static str| {
        let mut args = vec![target, repository.as_str()];
        args.extend(settings);
        make_n(&args)
    };
    let run = with("run-local")?;
    let started = run
        .iter()
        .find(|l| l.starts_with("podman run -d"))
        .with_context(|| format!("no podman run: {run:#?}"))?;
    let started = words(started);
    assert_eq!(values(&started, "--name"), ["gantry-registry-local"]);
    assert_eq!(values(&started, "--network"), ["host"]);
    assert!(
        started.contains(&"--read-only".to_owned()),
        "as deploy/ runs it"
    );
    assert!(started.contains(&reference), "{started:?}");
    assert!(
        started
            .iter()
            .any(|w| w.starts_with("GANTRY_REGISTRY_SOURCES=")),
        "{started:?}"
    );

    let test = with("test-image")?.join("\n");
    assert!(
        test.contains(&format!("podman run --rm {reference} --version")),
        "{test}"
    );
    assert!(test.contains("65532:65532"), "{test}");
    assert!(test.contains(".Config.Healthcheck"), "{test}");
    assert!(
        test.contains(&format!(
            "! podman run --rm --network none {reference} --probe"
        )),
        "the probe of a container where nothing serves must fail: {test}"
    );
    assert!(with("logs")?.contains(&"podman logs -f gantry-registry-local".to_owned()));
    assert!(with("stop")?.contains(&"podman rm -f gantry-registry-local".to_owned()));
    let clean = with("clean")?;
    assert!(
        clean.contains(&format!("podman rmi {reference}")),
        "{clean:#?}"
    );
    assert!(
        clean
            .iter()
            .any(|l| l.contains("rm -rf target/images target/image-digests"))
    );

    // The dispatcher runs on the kubernetes runtime, its probe is a subcommand.
    let run = make_n(&["run-local", "CONTAINER_ENGINE=docker"])?.join("\n");
    assert!(run.contains("--runtime=kubernetes"), "{run}");
    assert!(run.contains("KUBECONFIG=/etc/gantry/kubeconfig"), "{run}");
    let test = make_n(&["test-image", "CONTAINER_ENGINE=docker"])?.join("\n");
    assert!(test.contains("dispatcher:dev-local probe"), "{test}");
    Ok(())
}

#[test]
fn make_finds_podman_when_docker_is_not_installed() -> anyhow::Result<()> {
    let bin = tempfile::tempdir()?;
    program(bin.path(), "podman", "exit 0")?;
    let path = bin.path().display().to_string();
    let output = make(&["-n", "logs"], Some(&path))?;
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    assert!(
        stdout(&output).contains("podman logs -f gantry-dispatcher-local"),
        "{}",
        stdout(&output)
    );
    program(bin.path(), "docker", "exit 0")?;
    let output = make(&["-n", "logs"], Some(&path))?;
    assert!(
        stdout(&output).contains("docker logs -f gantry-dispatcher-local"),
        "docker first when both are there: {}",
        stdout(&output)
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------
// The health checks the images run

/// `gantry-dispatcher probe ARGS` with GANTRY_HTTP_ADDR=`http_addr`.
fn dispatcher_probe(args: &[&str], http_addr: &str) -> anyhow::Result<Output> {
    Command::new(gantry_tests::bin_path("gantry-dispatcher"))
        .arg("probe")
        .args(args)
        .env_remove("GANTRY_CONFIG")
        .env("GANTRY_HTTP_ADDR", http_addr)
        .output()
        .context("running gantry-dispatcher probe")
}

#[tokio::test]
async fn the_dispatcher_probe_exits_0_while_it_is_ready_and_1_when_nothing_answers()
-> anyhow::Result<()> {
    let env = gantry_tests::TestEnv::new(None).await?;
    let dispatcher = env.dispatcher_process()?;
    let port = dispatcher.http_addr()?.port();
    // As the image sets it: every interface, which the probe asks on loopback.
    let everywhere = format!("0.0.0.0:{port}");

    let ready = dispatcher_probe(&[], &everywhere)?;
    assert_eq!(ready.status.code(), Some(0), "{}", stderr(&ready));
    assert!(
        stdout(&ready).starts_with("ready\nbroker: ok\npostgres: ok"),
        "/readyz's answer: {}",
        stdout(&ready)
    );
    let live = dispatcher_probe(&["--live"], &everywhere)?;
    assert_eq!(live.status.code(), Some(0), "{}", stderr(&live));
    assert!(stdout(&live).starts_with("live\n"), "{}", stdout(&live));

    drop(dispatcher);
    let gone = dispatcher_probe(&[], &everywhere)?;
    assert_eq!(gone.status.code(), Some(1));
    assert!(
        stderr(&gone).contains(&format!("http://127.0.0.1:{port}/readyz: no answer")),
        "{}",
        stderr(&gone)
    );
    let off = dispatcher_probe(&[], "off")?;
    assert_eq!(off.status.code(), Some(1));
    assert!(
        stderr(&off).contains("GANTRY_HTTP_ADDR) is off"),
        "{}",
        stderr(&off)
    );
    env.cleanup().await
}
