//! A real source tree on the mount: a `.crate` from the cargo cache (a dependency of this
//! workspace, so any machine that built the tests has it) untarred into the mount and next to
//! it on local disk, compared with `diff -r` and with a manifest (type, mode, owner, size,
//! mtime, SHA-256 of every file) read back through a second mount; then `cargo build
//! --offline` of a small crate inside the mount and its binary run from there.

use crate::common::Cluster;
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The version of `name` in the workspace's Cargo.lock.
fn locked_version(name: &str) -> String {
    let lock = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../Cargo.lock");
    let text = fs::read_to_string(&lock).unwrap_or_else(|e| panic!("{}: {e}", lock.display()));
    let needle = format!("name = \"{name}\"\n");
    let at = text.find(&needle).unwrap_or_else(|| panic!("{name} is not in Cargo.lock"));
    let rest = &text[at + needle.len()..];
    let v = rest.strip_prefix("version = \"").and_then(|r| r.split('"').next());
    v.unwrap_or_else(|| panic!("no version after {name} in Cargo.lock")).to_string()
}

/// `NAME-VERSION.crate` (the locked version) in the cargo registry cache.
fn cached_crate(name: &str) -> PathBuf {
    let file = format!("{name}-{}.crate", locked_version(name));
    let home = std::env::var_os("CARGO_HOME").map(PathBuf::from).unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").expect("HOME")).join(".cargo"));
    let cache = home.join("registry/cache");
    let found = fs::read_dir(&cache).into_iter().flatten().flatten().map(|d| d.path().join(&file)).find(|p| p.exists());
    found.unwrap_or_else(|| panic!("{file} is not in {}: build the workspace first (cargo fetch)", cache.display()))
}

fn untar(archive: &Path, into: &Path) {
    fs::create_dir_all(into).unwrap();
    let out = Command::new("tar").arg("-xzf").arg(archive).arg("-C").arg(into).output().unwrap();
    assert!(out.status.success(), "tar -xzf {} -C {}: {}", archive.display(), into.display(), String::from_utf8_lossy(&out.stderr));
}

/// Path → "type mode uid:gid size mtime sha256" (or the link target), for every entry.
fn manifest(root: &Path) -> BTreeMap<String, String> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, String>) {
        let mut entries: Vec<_> = fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())).map(|e| e.unwrap().path()).collect();
        entries.sort();
        for p in entries {
            let md = fs::symlink_metadata(&p).unwrap();
            let rel = p.strip_prefix(root).unwrap().display().to_string();
            let common = format!("{:o} {}:{}", md.mode(), md.uid(), md.gid());
            let line = if md.is_dir() {
                walk(root, &p, out);
                // No mtime: a .crate has no directory entries, so tar makes them "now".
                format!("dir {common}")
            } else if md.file_type().is_symlink() {
                format!("symlink -> {}", fs::read_link(&p).unwrap().display())
            } else {
                let data = fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
                assert_eq!(data.len() as u64, md.len(), "{}: bytes read vs stat size", p.display());
                format!("file {common} {} mtime {}.{:09} sha256 {:x}", md.len(), md.mtime(), md.mtime_nsec(), Sha256::digest(&data))
            };
            out.insert(rel, line);
        }
    }
    let mut out = BTreeMap::new();
    walk(root, root, &mut out);
    out
}

fn same_manifest(what: &str, want: &BTreeMap<String, String>, got: &BTreeMap<String, String>) {
    let missing: Vec<_> = want.keys().filter(|k| !got.contains_key(*k)).collect();
    let extra: Vec<_> = got.keys().filter(|k| !want.contains_key(*k)).collect();
    let differ: Vec<_> = want.iter().filter_map(|(k, v)| got.get(k).filter(|g| *g != v).map(|g| format!("{k}: want {v}, got {g}"))).collect();
    assert!(missing.is_empty() && extra.is_empty() && differ.is_empty(), "{what}: missing {missing:?}, extra {extra:?}, differing:\n{}", differ.join("\n"));
}

/// tokio's published source (about 580 files) into the mount `a` and onto local disk.
pub fn untar_and_compare(c: &Cluster, a: &Path, b: &Path) {
    let archive = cached_crate("tokio");
    let local = c.path().join("local-src");
    untar(&archive, &local);
    untar(&archive, &a.join("src"));
    let top = fs::read_dir(&local).unwrap().next().expect("the archive has a top directory").unwrap().file_name();
    let out = Command::new("diff").arg("-r").arg("--no-dereference").arg(local.join(&top)).arg(a.join("src").join(&top)).output().unwrap();
    assert!(out.status.success(), "diff -r local vs mount:\n{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    let want = manifest(&local.join(&top));
    assert!(want.len() > 100, "a real tree: {} entries", want.len());
    same_manifest("the tree on the mount that wrote it", &want, &manifest(&a.join("src").join(&top)));
    // Another client reads what this one wrote and closed.
    same_manifest("the tree through a second mount", &want, &manifest(&b.join("src").join(&top)));
}

/// A binary crate with a path dependency (heck, from the cargo cache), both in the mount,
/// built offline with its target directory in the mount, then run from the mount.
pub fn cargo_build_in_mount(a: &Path) {
    let work = a.join("build");
    untar(&cached_crate("heck"), &work);
    let heck = format!("heck-{}", locked_version("heck"));
    let hello = work.join("hello");
    fs::create_dir_all(hello.join("src")).unwrap();
    fs::write(hello.join("Cargo.toml"), format!("[package]\nname = \"hello\"\nversion = \"0.1.0\"\nedition = \"2021\"\n\n[dependencies]\nheck = {{ path = \"../{heck}\" }}\n")).unwrap();
    fs::write(hello.join("src/main.rs"), "use heck::ToUpperCamelCase;\n\nfn main() {\n    println!(\"{}\", \"built_on_strata\".to_upper_camel_case());\n}\n").unwrap();
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let build = || {
        let out = Command::new(&cargo).args(["build", "--offline"]).current_dir(&hello).env("CARGO_TARGET_DIR", hello.join("target")).env_remove("CARGO_BUILD_TARGET_DIR").output().unwrap();
        assert!(out.status.success(), "cargo build in the mount:\n{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let first = build();
    assert!(first.contains("Compiling heck") && first.contains("Compiling hello"), "{first}");
    let out = Command::new(hello.join("target/debug/hello")).output().unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "BuiltOnStrata", "the binary runs from the mount");
    // Fingerprints (file mtimes and dep-info) read back: nothing is rebuilt.
    let second = build();
    assert!(!second.contains("Compiling"), "a second build rebuilds nothing:\n{second}");
}
