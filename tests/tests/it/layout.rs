//! The floor plan: no import cycles between the files of any crate. A file that declares a
//! module (`mod x;`) or names an item of another file (`use crate::…`, `use super::…`,
//! `crate::a::b` in an expression) depends on it; production code must have no cycle of
//! such dependencies, so that following a task from delivery to result never returns to a
//! file it has left. Test modules (`#[cfg(test)]`) are left out.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The crates whose sources are checked, by their `src` directory.
const CRATES: [&str; 7] = [
    "shared",
    "producer",
    "cli",
    "dispatcher",
    "executor",
    "tests",
    "registry",
];

#[test]
fn no_file_of_any_crate_imports_a_file_that_imports_it_back() -> anyhow::Result<()> {
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the tests crate sits in the workspace");
    let mut found = Vec::new();
    for name in CRATES.iter().copied().chain(extra_crates(workspace)) {
        let src = workspace.join(name).join("src");
        if !src.is_dir() {
            continue;
        }
        // The library, then each binary made of several files (a crate of its own).
        let mut roots = vec![(name.to_owned(), src.clone())];
        if let Ok(bins) = std::fs::read_dir(src.join("bin")) {
            for bin in bins {
                let dir = bin?.path();
                if dir.is_dir() {
                    let bin = dir
                        .file_name()
                        .unwrap_or_default()
                        .to_string_lossy()
                        .into_owned();
                    roots.push((format!("{name} (bin {bin})"), dir));
                }
            }
        }
        for (crate_name, root) in roots {
            for cycle in Graph::of(&root)?.cycles() {
                found.push(format!("{crate_name}: {}", cycle.join(" → ")));
            }
        }
    }
    assert!(
        found.is_empty(),
        "import cycles between files (a file must not import the files that import it; move \
         what both need into a file of its own):\n{}",
        found.join("\n")
    );
    Ok(())
}

#[test]
fn the_checker_finds_a_cycle_through_super_and_one_through_a_root_re_export() -> anyhow::Result<()>
{
    let dir = tempfile::tempdir()?;
    let src = dir.path();
    std::fs::create_dir_all(src.join("role"))?;
    std::fs::write(
        src.join("lib.rs"),
        "mod error;\nmod role;\npub use error::Error;\n",
    )?;
    std::fs::write(src.join("error.rs"), "pub struct Error;\n")?;
    std::fs::write(
        src.join("role/mod.rs"),
        "mod step;\npub(crate) struct Ctx;\nuse crate::Error;\n",
    )?;
    std::fs::write(
        src.join("role/step.rs"),
        "use super::Ctx;\nuse crate::Error;\n#[cfg(test)]\nmod tests { use crate::role::Ctx; }\n",
    )?;
    let cycles = Graph::of(src)?.cycles();
    assert_eq!(
        cycles,
        vec![vec![
            "role/mod.rs".to_owned(),
            "role/step.rs".to_owned(),
            "role/mod.rs".to_owned()
        ]],
        "the root's re-export of Error is no cycle; step.rs using its parent's Ctx is"
    );
    std::fs::write(src.join("role/step.rs"), "use crate::Error;\n")?;
    assert!(Graph::of(src)?.cycles().is_empty());
    Ok(())
}

/// Crates added beside the original four (any workspace member with a `src`).
fn extra_crates(workspace: &Path) -> Vec<&'static str> {
    ["bench", "kube-double"]
        .into_iter()
        .filter(|c| workspace.join(c).join("src").is_dir())
        .collect()
}

/// The files of one crate and which files each depends on.
struct Graph {
    edges: BTreeMap<String, BTreeSet<String>>,
}

impl Graph {
    fn of(src: &Path) -> anyhow::Result<Graph> {
        let mut files = Vec::new();
        collect(src, &mut files)?;
        let mut sources = BTreeMap::new();
        for file in &files {
            let rel = file.strip_prefix(src)?.to_string_lossy().replace('\\', "/");
            let text = std::fs::read_to_string(file)?;
            sources.insert(rel, production_code(&strip_comments(&text)));
        }
        let crate_ = Crate { sources: &sources };
        let mut edges = BTreeMap::new();
        for (file, code) in &sources {
            let mut deps = BTreeSet::new();
            for child in mod_declarations(code) {
                if let Some(f) = crate_.child_file(file, &child) {
                    deps.insert(f);
                }
            }
            for path in paths(code) {
                if let Some(target) = crate_.resolve(file, &path) {
                    deps.insert(target);
                }
            }
            deps.remove(file);
            edges.insert(file.clone(), deps);
        }
        Ok(Graph { edges })
    }

    /// Each cycle once, as the files along it, first file repeated at the end.
    fn cycles(&self) -> Vec<Vec<String>> {
        let mut cycles: Vec<Vec<String>> = Vec::new();
        let mut seen: BTreeSet<BTreeSet<String>> = BTreeSet::new();
        for start in self.edges.keys() {
            let mut path = vec![start.clone()];
            self.walk(start, &mut path, &mut cycles, &mut seen);
        }
        cycles
    }

    fn walk(
        &self,
        start: &str,
        path: &mut Vec<String>,
        cycles: &mut Vec<Vec<String>>,
        seen: &mut BTreeSet<BTreeSet<String>>,
    ) {
        let Some(last) = path.last().cloned() else {
            return;
        };
        for next in self.edges.get(&last).into_iter().flatten() {
            if next == start {
                let members: BTreeSet<String> = path.iter().cloned().collect();
                if seen.insert(members) {
                    let mut cycle = path.clone();
                    cycle.push(start.to_owned());
                    cycles.push(cycle);
                }
            } else if !path.contains(next) && next.as_str() > start {
                path.push(next.clone());
                self.walk(start, path, cycles, seen);
                path.pop();
            }
        }
    }
}

fn collect(dir: &Path, files: &mut Vec<PathBuf>) -> anyhow::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() {
            if path.file_name().is_some_and(|n| n != "bin") {
                collect(&path, files)?;
            }
        } else if path.extension().is_some_and(|e| e == "rs") {
            files.push(path);
        }
    }
    Ok(())
}

/// The crate's files, for resolving module paths.
struct Crate<'a> {
    sources: &'a BTreeMap<String, String>,
}

impl Crate<'_> {
    /// The module path of a file: `dispatch/mod.rs` → `["dispatch"]`, `lib.rs` → `[]`.
    fn module_of(file: &str) -> Vec<String> {
        let trimmed = file.trim_end_matches(".rs");
        let mut parts: Vec<String> = trimmed.split('/').map(str::to_owned).collect();
        if matches!(
            parts.last().map(String::as_str),
            Some("mod" | "lib" | "main")
        ) {
            parts.pop();
        }
        parts
    }

    /// The file of the module at `path` (from the crate root), if it is a file of its own.
    fn file_of(&self, path: &[String]) -> Option<String> {
        if path.is_empty() {
            return ["lib.rs", "main.rs"]
                .into_iter()
                .find(|f| self.sources.contains_key(*f))
                .map(str::to_owned);
        }
        let base = path.join("/");
        [format!("{base}.rs"), format!("{base}/mod.rs")]
            .into_iter()
            .find(|f| self.sources.contains_key(f))
    }

    /// The file declared by `mod child;` in `parent`.
    fn child_file(&self, parent: &str, child: &str) -> Option<String> {
        let mut path = Self::module_of(parent);
        // `a.rs` declaring `mod b;` means `a/b.rs`, like `a/mod.rs` does.
        path.push(child.to_owned());
        self.file_of(&path)
    }

    /// The file that defines what `path` (as written in `file`) names: the deepest module
    /// file along the path, following the re-exports (`pub use`) of that module.
    fn resolve(&self, file: &str, path: &[String]) -> Option<String> {
        let mut module = match path.first().map(String::as_str) {
            Some("crate") => Vec::new(),
            Some("super") => {
                let mut m = Self::module_of(file);
                m.pop();
                m
            }
            Some("self") => Self::module_of(file),
            _ => return None,
        };
        let mut rest = &path[1..];
        while let Some(segment) = rest.first() {
            if segment == "super" {
                module.pop();
                rest = &rest[1..];
                continue;
            }
            let mut deeper = module.clone();
            deeper.push(segment.clone());
            if self.file_of(&deeper).is_none() {
                break;
            }
            module = deeper;
            rest = &rest[1..];
        }
        let target = self.file_of(&module)?;
        // An item re-exported by its module (`pub use x::Item`) lives where it came from.
        match rest.first() {
            Some(item) if item != "*" => Some(
                self.reexport(&target, item)
                    .and_then(|p| self.resolve(&target, &p))
                    .unwrap_or(target),
            ),
            _ => Some(target),
        }
    }

    /// The path a module file re-exports `item` from, made absolute from that file.
    fn reexport(&self, file: &str, item: &str) -> Option<Vec<String>> {
        let code = self.sources.get(file)?;
        for statement in use_statements(code).filter(|(public, _)| *public) {
            for (path, name) in expand_named(&statement.1) {
                if name == item {
                    let head = path.first().map(String::as_str);
                    return Some(match head {
                        Some("crate" | "super" | "self") => path,
                        // `pub use error::Error;` in a module file: a child module.
                        _ => std::iter::once("self".to_owned()).chain(path).collect(),
                    });
                }
            }
        }
        None
    }
}

fn strip_comments(text: &str) -> String {
    text.lines()
        .map(|l| match l.find("//") {
            Some(i) if !l[..i].contains('"') => &l[..i],
            _ => l,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// The code without `#[cfg(test)]` items (a test module, or a test-only item).
fn production_code(code: &str) -> String {
    let mut out = String::new();
    let mut rest = code;
    while let Some(i) = rest.find("#[cfg(test)]") {
        out.push_str(&rest[..i]);
        let after = &rest[i + "#[cfg(test)]".len()..];
        // Skip the next item: up to its `;` or its balanced `{ … }`.
        let mut depth = 0usize;
        let mut end = after.len();
        for (j, c) in after.char_indices() {
            match c {
                '{' => depth += 1,
                '}' => {
                    depth = depth.saturating_sub(1);
                    if depth == 0 {
                        end = j + 1;
                        break;
                    }
                }
                ';' if depth == 0 => {
                    end = j + 1;
                    break;
                }
                _ => {}
            }
        }
        rest = &after[end..];
    }
    out.push_str(rest);
    out
}

fn mod_declarations(code: &str) -> Vec<String> {
    let mut mods = Vec::new();
    for line in code.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        if let Some(i) = words.iter().position(|w| *w == "mod")
            && words[..i]
                .iter()
                .all(|w| w.starts_with("pub") || w.starts_with("#["))
            && let Some(name) = words.get(i + 1).and_then(|n| n.strip_suffix(';'))
        {
            mods.push(name.to_owned());
        }
    }
    mods
}

/// `use` statements: whether public, and the text between `use` and `;`.
fn use_statements(code: &str) -> impl Iterator<Item = (bool, String)> + '_ {
    let mut found = Vec::new();
    let mut rest = code;
    while let Some(i) = rest.find("use ") {
        let before = &rest[..i];
        let at_start = before
            .chars()
            .last()
            .is_none_or(|c| c.is_whitespace() || c == ';' || c == '{' || c == '}');
        let after = &rest[i + 4..];
        let Some(end) = after.find(';') else { break };
        if at_start {
            let line_start = before.rfind('\n').map_or(0, |n| n + 1);
            let public = before[line_start..].trim_start().starts_with("pub");
            found.push((public, after[..end].to_owned()));
        }
        rest = &after[end..];
    }
    found.into_iter()
}

/// Every path a file names within its crate: its `use` statements, expanded, and
/// `crate::…` / `super::…` paths written in its code.
fn paths(code: &str) -> Vec<Vec<String>> {
    let mut all: Vec<Vec<String>> = use_statements(code)
        .flat_map(|(_, text)| expand(&text))
        .collect();
    for head in ["crate::", "super::"] {
        let mut rest = code;
        while let Some(i) = rest.find(head) {
            let before = rest[..i].chars().last();
            let tail: String = rest[i..]
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_' || *c == ':')
                .collect();
            let path: Vec<String> = tail
                .split("::")
                .filter(|s| !s.is_empty())
                .map(str::to_owned)
                .collect();
            // `crate::a::{…}` is a `use` statement's, expanded above.
            let grouped = tail.ends_with("::");
            // Inside a longer path (`super::super::x`) it is that path's, not one of its own.
            let inside = before.is_some_and(|c| c.is_alphanumeric() || c == '_' || c == ':');
            if !inside && !grouped {
                all.push(path);
            }
            rest = &rest[i + head.len()..];
        }
    }
    all
}

/// `a::{b, c::{d, e}}` → `[a, b]`, `[a, c, d]`, `[a, c, e]`; `x as y` → `x`.
fn expand(text: &str) -> Vec<Vec<String>> {
    expand_named(text)
        .into_iter()
        .map(|(path, _)| path)
        .collect()
}

/// [`expand`], with the name each path is known by where it is imported (`y` for
/// `x as y`, else its last segment).
fn expand_named(text: &str) -> Vec<(Vec<String>, String)> {
    let text: String = text.split_whitespace().collect::<Vec<_>>().join(" ");
    expand_from(&[], &text)
}

fn expand_from(prefix: &[String], text: &str) -> Vec<(Vec<String>, String)> {
    let text = text.trim();
    if let Some(open) = text.find('{') {
        let head: Vec<String> = text[..open]
            .split("::")
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .collect();
        let inner = &text[open + 1..text.rfind('}').unwrap_or(text.len())];
        let mut base = prefix.to_vec();
        base.extend(head);
        split_top(inner)
            .into_iter()
            .flat_map(|part| expand_from(&base, part))
            .collect()
    } else {
        let mut parts = text.split(" as ");
        let path = parts.next().unwrap_or(text);
        let alias = parts.next().map(|a| a.trim().to_owned());
        let mut full = prefix.to_vec();
        full.extend(
            path.split("::")
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(str::to_owned),
        );
        if full.last().map(String::as_str) == Some("self") {
            full.pop();
        }
        let name = alias.or_else(|| full.last().cloned()).unwrap_or_default();
        vec![(full, name)]
    }
}

/// Splits on the commas that are not inside braces.
fn split_top(text: &str) -> Vec<&str> {
    let mut parts = Vec::new();
    let (mut depth, mut start) = (0usize, 0);
    for (i, c) in text.char_indices() {
        match c {
            '{' => depth += 1,
            '}' => depth = depth.saturating_sub(1),
            ',' if depth == 0 => {
                parts.push(&text[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(&text[start..]);
    parts.into_iter().filter(|p| !p.trim().is_empty()).collect()
}
