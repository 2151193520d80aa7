//! A Secret volume written exactly the way the kubelet's atomic writer does it, plus the other
//! ways files get replaced (in place, rename over, delete and re-create), for watcher tests.
//!
//! The kubelet's sequence (kubernetes `pkg/volume/util/atomic_writer.go`), which [`SecretDir::write`]
//! reproduces step by step:
//!
//! 1. read `..data` to find the current timestamped directory; skip the update when every key
//!    already has the same content and no key is gone;
//! 2. create a new directory `..YYYY_MM_DD_HH_MM_SS.<random>` (UTC, mode 0755);
//! 3. write every key into it (mode 0644, the Secret volume default);
//! 4. create the relative symlink `..data_tmp -> ..YYYY_...`;
//! 5. rename `..data_tmp` over `..data` (the atomic switch);
//! 6. create the missing user-visible symlinks `key -> ..data/key`;
//! 7. remove the user-visible symlinks of keys no longer present;
//! 8. remove the previous timestamped directory.

use std::collections::BTreeSet;
use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::{PermissionsExt, symlink};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use rand::Rng;

const DATA_DIR: &str = "..data";
const NEW_DATA_DIR: &str = "..data_tmp";

/// A directory laid out like a mounted Secret: `key -> ..data/key`, `..data -> ..<timestamp>`.
pub struct SecretDir {
    root: PathBuf,
    /// Keeps a temporary directory alive; removed on drop.
    _temp: Option<tempfile::TempDir>,
}

impl SecretDir {
    /// A fresh, empty Secret directory in a temporary location, removed on drop.
    pub fn new() -> io::Result<SecretDir> {
        let temp = tempfile::Builder::new().prefix("secret-").tempdir()?;
        Ok(SecretDir {
            root: temp.path().to_path_buf(),
            _temp: Some(temp),
        })
    }

    /// A Secret directory at `path` (created if missing), left in place on drop.
    pub fn at(path: impl Into<PathBuf>) -> io::Result<SecretDir> {
        let root = path.into();
        fs::create_dir_all(&root)?;
        Ok(SecretDir { root, _temp: None })
    }

    /// The volume's mount directory.
    pub fn path(&self) -> &Path {
        &self.root
    }

    /// Path of one key's file (the symlink the application reads).
    pub fn file(&self, key: &str) -> PathBuf {
        self.root.join(key)
    }

    /// Publishes a new version of the whole Secret with the atomic writer sequence. Keys not in
    /// `files` disappear, as when a key is removed from the Secret. Like the kubelet, does
    /// nothing when the content is already identical (use [`SecretDir::write_always`] to force
    /// a new `..data` generation).
    pub fn write(&self, files: &[(&str, &[u8])]) -> io::Result<()> {
        self.atomic_write(files, false)
    }

    /// The atomic writer sequence even when nothing changed (a fresh `..data` with the same
    /// bytes), to prove consumers compare content rather than events.
    pub fn write_always(&self, files: &[(&str, &[u8])]) -> io::Result<()> {
        self.atomic_write(files, true)
    }

    fn atomic_write(&self, files: &[(&str, &[u8])], force: bool) -> io::Result<()> {
        for (key, _) in files {
            validate_key(key)?;
        }
        // (1) current generation
        let data_dir = self.root.join(DATA_DIR);
        let old_ts = match fs::read_link(&data_dir) {
            Ok(target) => Some(target),
            Err(err) if err.kind() == io::ErrorKind::NotFound => None,
            Err(err) => return Err(err),
        };
        let new_keys: BTreeSet<&str> = files.iter().map(|(k, _)| *k).collect();
        let mut to_remove = Vec::new();
        if let Some(old_ts) = &old_ts {
            let old_dir = self.root.join(old_ts);
            for entry in fs::read_dir(&old_dir)? {
                let name = entry?.file_name().to_string_lossy().into_owned();
                if !new_keys.contains(name.as_str()) {
                    to_remove.push(name);
                }
            }
            let unchanged = files
                .iter()
                .all(|(key, data)| fs::read(old_dir.join(key)).is_ok_and(|old| old == *data));
            if unchanged && to_remove.is_empty() && !force {
                return Ok(());
            }
        }
        // (2) new timestamped directory
        let ts_name = self.new_timestamp_dir()?;
        let ts_dir = self.root.join(&ts_name);
        // (3) payload
        for (key, data) in files {
            let path = ts_dir.join(key);
            let mut file = fs::File::create(&path)?;
            file.write_all(data)?;
            fs::set_permissions(&path, fs::Permissions::from_mode(0o644))?;
        }
        // (4) ..data_tmp -> new dir (relative)
        let tmp_link = self.root.join(NEW_DATA_DIR);
        if let Err(err) = symlink(&ts_name, &tmp_link) {
            let _ = fs::remove_dir_all(&ts_dir);
            return Err(err);
        }
        // (5) the atomic switch
        if let Err(err) = fs::rename(&tmp_link, &data_dir) {
            let _ = fs::remove_file(&tmp_link);
            let _ = fs::remove_dir_all(&ts_dir);
            return Err(err);
        }
        // (6) user-visible symlinks for new keys
        for key in &new_keys {
            let visible = self.root.join(key);
            match fs::read_link(&visible) {
                Ok(_) => {}
                Err(err) if err.kind() == io::ErrorKind::NotFound => {
                    symlink(Path::new(DATA_DIR).join(key), &visible)?;
                }
                Err(err) => return Err(err),
            }
        }
        // (7) user-visible symlinks of removed keys
        for key in &to_remove {
            fs::remove_file(self.root.join(key))?;
        }
        // (8) previous generation
        if let Some(old_ts) = old_ts {
            fs::remove_dir_all(self.root.join(old_ts))?;
        }
        Ok(())
    }

    /// Creates `..YYYY_MM_DD_HH_MM_SS.<random>` (UTC) like Go's `os.MkdirTemp` with the
    /// kubelet's prefix, mode 0755; returns its name.
    fn new_timestamp_dir(&self) -> io::Result<String> {
        let prefix = timestamp_prefix(SystemTime::now());
        let mut rng = rand::rng();
        for _ in 0..100 {
            let name = format!("{prefix}{}", rng.random_range(0..u32::MAX));
            match fs::create_dir(self.root.join(&name)) {
                Ok(()) => {
                    fs::set_permissions(self.root.join(&name), fs::Permissions::from_mode(0o755))?;
                    return Ok(name);
                }
                Err(err) if err.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(err) => return Err(err),
            }
        }
        Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            "could not create a unique timestamped directory",
        ))
    }

    /// Writes a regular file `key` in place (truncate and write the same inode), the way an
    /// editor or `echo > file` does; replaces a kubelet symlink with a regular file first.
    pub fn write_in_place(&self, key: &str, data: &[u8]) -> io::Result<()> {
        validate_key(key)?;
        let path = self.root.join(key);
        if fs::symlink_metadata(&path).is_ok_and(|m| m.file_type().is_symlink()) {
            fs::remove_file(&path)?;
        }
        let mut file = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)?;
        file.write_all(data)
    }

    /// Writes `key` to a temporary file in the same directory and renames it over `key`
    /// (what most config-management tools and `kubectl cp`-style writers do).
    pub fn write_rename(&self, key: &str, data: &[u8]) -> io::Result<()> {
        validate_key(key)?;
        let tmp = self.root.join(format!(".{key}.tmp"));
        let mut file = fs::File::create(&tmp)?;
        file.write_all(data)?;
        file.sync_all()?;
        fs::rename(&tmp, self.root.join(key))
    }

    /// Deletes `key` (file or symlink) if present.
    pub fn remove(&self, key: &str) -> io::Result<()> {
        validate_key(key)?;
        match fs::remove_file(self.root.join(key)) {
            Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(()),
            other => other,
        }
    }

    /// Deletes `key` and creates it again as a new regular file (new inode).
    pub fn recreate(&self, key: &str, data: &[u8]) -> io::Result<()> {
        self.remove(key)?;
        self.write_in_place(key, data)
    }

    /// Deletes the whole directory (as when a volume is unmounted or a tool wipes it).
    pub fn remove_dir(&self) -> io::Result<()> {
        fs::remove_dir_all(&self.root)
    }

    /// Deletes the whole directory, creates it again empty and publishes `files` with the
    /// atomic writer into the new directory.
    /// Also works when the directory is already gone.
    pub fn recreate_dir(&self, files: &[(&str, &[u8])]) -> io::Result<()> {
        match self.remove_dir() {
            Err(err) if err.kind() == io::ErrorKind::NotFound => {}
            other => other?,
        }
        fs::create_dir(&self.root)?;
        self.write(files)
    }
}

/// The kubelet rejects keys that are empty, contain a path separator or start with `..`.
fn validate_key(key: &str) -> io::Result<()> {
    if key.is_empty() || key.contains('/') || key.starts_with("..") {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("invalid Secret key {key:?}: must be a plain file name not starting with '..'"),
        ));
    }
    Ok(())
}

/// `..2006_01_02_15_04_05.` in UTC, the prefix Go's time format gives the kubelet.
fn timestamp_prefix(now: SystemTime) -> String {
    let secs = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let (year, month, day) = civil_from_days(days);
    format!(
        "..{year:04}_{month:02}_{day:02}_{:02}_{:02}_{:02}.",
        rem / 3600,
        (rem % 3600) / 60,
        rem % 60
    )
}

/// Days since 1970-01-01 to a proleptic Gregorian date (Howard Hinnant's algorithm).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn timestamp_prefix_matches_go_layout() {
        // 2026-11-22T03:04:05Z
        let t = UNIX_EPOCH + Duration::from_secs(1_795_316_645);
        assert_eq!(timestamp_prefix(t), "..2026_11_22_03_04_05.");
        assert_eq!(timestamp_prefix(UNIX_EPOCH), "..1970_01_01_00_00_00.");
        // leap day
        let t = UNIX_EPOCH + Duration::from_secs(1_709_164_800);
        assert_eq!(timestamp_prefix(t), "..2024_02_29_00_00_00.");
    }

    #[test]
    fn atomic_writer_layout() -> io::Result<()> {
        let dir = SecretDir::new()?;
        dir.write(&[("a", b"1"), ("b", b"2")])?;
        let first = fs::read_link(dir.path().join(DATA_DIR))?;
        assert!(first.to_string_lossy().starts_with(".."));
        assert_eq!(fs::read_link(dir.file("a"))?, Path::new("..data/a"));
        assert_eq!(fs::read(dir.file("b"))?, b"2");

        // Unchanged content: no new generation.
        dir.write(&[("a", b"1"), ("b", b"2")])?;
        assert_eq!(fs::read_link(dir.path().join(DATA_DIR))?, first);

        // Key b removed, c added: new generation, old one gone, b's symlink gone.
        dir.write(&[("a", b"1"), ("c", b"3")])?;
        let second = fs::read_link(dir.path().join(DATA_DIR))?;
        assert_ne!(second, first);
        assert!(!dir.path().join(&first).exists());
        assert!(fs::symlink_metadata(dir.file("b")).is_err());
        assert_eq!(fs::read(dir.file("c"))?, b"3");
        assert!(fs::symlink_metadata(dir.path().join(NEW_DATA_DIR)).is_err());
        let mode = fs::metadata(dir.path().join(&second))?.permissions().mode() & 0o777;
        assert_eq!(mode, 0o755);

        // Forced rewrite of identical content still swaps generations.
        dir.write_always(&[("a", b"1"), ("c", b"3")])?;
        assert_ne!(fs::read_link(dir.path().join(DATA_DIR))?, second);
        assert!(dir.write(&[("..x", b"")]).is_err());
        Ok(())
    }
}
