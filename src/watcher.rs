//! Restart on file change: `WSGI_RESTART_FILE_REGEX` with wfastcgi.py's meaning.
//!
//! The pattern is matched like Python's `re.match`: anchored at the start of the changed file's
//! path relative to the watched folder, not at its end. The path is tried twice, written with `\`
//! (as wfastcgi.py saw it on Windows) and with `/`; a change restarts when either matches, so a
//! pattern written for one separator works on both systems.
//!
//! Each folder gets its own non-recursive watch, so no watch is spent on `__pycache__`, version
//! control folders, `node_modules` or virtualenvs; folders created later are watched as they
//! appear. Bursts of events (an editor's save, a `git checkout`) are coalesced into one restart.
//! An overflowed event queue counts as a change. When the inotify watch limit is hit, or
//! `WSGI_WATCHER_POLL` asks for it (network shares have no change notifications), the folders are
//! polled instead.

use std::path::{Component, Path, PathBuf};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use notify::event::EventKind;
use notify::{Event, PollWatcher, RecommendedWatcher, RecursiveMode, Watcher};
use regex::Regex;

use crate::config::DEFAULT_RESTART_REGEX;
use crate::shutdown::{Reason, Trigger};

/// A burst ends after this long without another event...
const QUIET: Duration = Duration::from_millis(300);
/// ...or this long after it started, whichever is first.
const BURST_LIMIT: Duration = Duration::from_secs(3);

/// Folders that never hold code the application imports from the app folder.
const SKIPPED_DIRS: &[&str] = &[
    "__pycache__",
    ".git",
    ".hg",
    ".svn",
    "node_modules",
    ".mypy_cache",
    ".pytest_cache",
    ".tox",
];

#[derive(Debug, Clone)]
pub struct WatchSettings {
    /// The app folder first, then `WSGI_WATCHER_DIRS`.
    pub roots: Vec<PathBuf>,
    /// `WSGI_RESTART_FILE_REGEX`; `None` when it is the empty string (no watching).
    pub pattern: Option<String>,
    /// Poll every this often instead of using change notifications.
    pub poll_interval: Option<Duration>,
    /// Says why a restart cannot happen now (an in-place re-exec whose binary is gone): the
    /// change is then logged and the process keeps serving.
    pub can_restart: Option<fn() -> Result<(), String>>,
}

/// `re.match` semantics: anchored at the start only.
pub fn compile_pattern(pattern: &str) -> Result<Regex, regex::Error> {
    Regex::new(&format!(r"\A(?:{pattern})"))
}

/// Whether a changed file, relative to its watched folder, restarts the process.
pub fn matches(regex: &Regex, relative: &Path) -> bool {
    let parts: Vec<String> = relative
        .components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect();
    regex.is_match(&parts.join("\\")) || regex.is_match(&parts.join("/"))
}

/// True for a path inside a folder that is never watched.
pub fn is_skipped(relative: &Path) -> bool {
    relative.components().any(|c| match c {
        Component::Normal(name) => SKIPPED_DIRS.iter().any(|s| name == *s),
        _ => false,
    })
}

fn is_virtualenv(dir: &Path) -> bool {
    dir.join("pyvenv.cfg").is_file()
}

/// Starts watching on a thread of its own. Problems are logged; they never stop serving.
pub fn spawn(settings: WatchSettings, trigger: Trigger) {
    let Some(pattern) = settings.pattern.as_deref() else {
        tracing::info!("WSGI_RESTART_FILE_REGEX is empty: not watching for changes");
        return;
    };
    let regex = compile_pattern(pattern).unwrap_or_else(|e| {
        tracing::error!(
            "WSGI_RESTART_FILE_REGEX {pattern:?} cannot be used ({e}); watching with the default {DEFAULT_RESTART_REGEX:?}"
        );
        compile_pattern(DEFAULT_RESTART_REGEX).expect("the default pattern compiles")
    });
    let spawned = std::thread::Builder::new()
        .name("wfastcgi-watcher".into())
        .spawn(move || watch(settings, regex, trigger));
    if let Err(e) = spawned {
        tracing::error!("cannot start the file watcher: {e}");
    }
}

/// The notification back end in use; dropping it stops the watching.
enum Backend {
    Notify(RecommendedWatcher),
    Poll(PollWatcher),
}

struct Watch {
    roots: Vec<PathBuf>,
    regex: Regex,
    backend: Backend,
    sender: mpsc::Sender<notify::Result<Event>>,
    can_restart: Option<fn() -> Result<(), String>>,
    /// Watcher errors already logged: the poller reports the same one (a symlink loop) on
    /// every scan, for ever.
    logged_errors: std::collections::HashSet<String>,
}

fn watch(settings: WatchSettings, regex: Regex, trigger: Trigger) {
    let (sender, events) = mpsc::channel();
    let roots: Vec<PathBuf> = settings
        .roots
        .iter()
        .filter_map(|root| match crate::config::resolve_dir(root) {
            Ok(root) => Some(root),
            Err(e) => {
                tracing::error!("cannot watch {}: {e}", root.display());
                None
            }
        })
        .collect();
    let backend = match settings.poll_interval {
        Some(interval) => poll_backend(&sender, interval),
        None => {
            RecommendedWatcher::new(sender.clone(), notify::Config::default()).map(Backend::Notify)
        }
    };
    let backend = match backend {
        Ok(backend) => backend,
        Err(e) => {
            tracing::error!("cannot watch for changes: {e}");
            return;
        }
    };
    let mut watch = Watch {
        roots,
        regex,
        backend,
        sender,
        can_restart: settings.can_restart,
        logged_errors: std::collections::HashSet::new(),
    };
    for root in watch.roots.clone() {
        watch.add_tree(&root);
    }
    let mode = match watch.backend {
        Backend::Notify(_) => "change notifications".to_owned(),
        Backend::Poll(_) => "polling".to_owned(),
    };
    let folders: Vec<String> = watch
        .roots
        .iter()
        .map(|r| r.display().to_string())
        .collect();
    tracing::info!(
        "watching {} for files matching {:?} ({mode})",
        folders.join(", "),
        watch
            .regex
            .as_str()
            .trim_start_matches(r"\A(?:")
            .trim_end_matches(')')
    );
    watch.run(&events, &trigger);
}

fn poll_backend(
    sender: &mpsc::Sender<notify::Result<Event>>,
    interval: Duration,
) -> notify::Result<Backend> {
    let config = notify::Config::default().with_poll_interval(interval);
    PollWatcher::new(sender.clone(), config).map(Backend::Poll)
}

impl Watch {
    /// Watches `dir` and the folders below it, except the skipped ones. Returns the files found
    /// (a folder created after start-up may already hold the file that matters).
    fn add_tree(&mut self, dir: &Path) -> Vec<PathBuf> {
        let mut files = Vec::new();
        let mut pending = vec![dir.to_path_buf()];
        while let Some(dir) = pending.pop() {
            if is_virtualenv(&dir) || self.relative(&dir).is_some_and(|r| is_skipped(&r)) {
                continue;
            }
            if !self.add_dir(&dir) {
                return files;
            }
            let Ok(entries) = std::fs::read_dir(&dir) else {
                continue;
            };
            for entry in entries.flatten() {
                match entry.file_type() {
                    Ok(kind) if kind.is_dir() => pending.push(entry.path()),
                    Ok(_) => files.push(entry.path()),
                    Err(_) => {}
                }
            }
        }
        files
    }

    /// Watches one folder; false when watching cannot go on this way.
    fn add_dir(&mut self, dir: &Path) -> bool {
        let is_root = self.roots.iter().any(|r| r == dir);
        let result = match &mut self.backend {
            Backend::Notify(watcher) => watcher.watch(dir, RecursiveMode::NonRecursive),
            // The poller scans below its roots by itself.
            Backend::Poll(_) if !is_root => return true,
            Backend::Poll(watcher) => watcher.watch(dir, RecursiveMode::Recursive),
        };
        match result {
            Ok(()) => true,
            Err(e) if is_watch_limit(&e) => {
                tracing::warn!(
                    "the inotify watch limit is reached ({e}); polling every 2 s instead. \
                     Raise the limit with: sysctl fs.inotify.max_user_watches=524288"
                );
                self.fall_back_to_polling()
            }
            Err(e) => {
                tracing::warn!("cannot watch {}: {e}", dir.display());
                true
            }
        }
    }

    fn fall_back_to_polling(&mut self) -> bool {
        match poll_backend(&self.sender, Duration::from_secs(2)) {
            Ok(backend) => {
                self.backend = backend;
                for root in self.roots.clone() {
                    self.add_dir(&root);
                }
            }
            Err(e) => tracing::error!("cannot poll for changes either: {e}"),
        }
        false
    }

    /// `path` relative to the watched folder it is in.
    fn relative(&self, path: &Path) -> Option<PathBuf> {
        self.roots
            .iter()
            .filter_map(|root| path.strip_prefix(root).ok())
            .min_by_key(|relative| relative.components().count())
            .map(Path::to_path_buf)
    }

    /// The relative path of `path` if a change to it restarts the process.
    fn restarts(&self, path: &Path) -> Option<PathBuf> {
        let relative = self.relative(path)?;
        let restarts = !is_skipped(&relative)
            && matches(&self.regex, &relative)
            // The poller also sees inside virtualenvs, which notifications never watch.
            && !path.ancestors().skip(1).take(relative.components().count()).any(is_virtualenv);
        restarts.then_some(relative)
    }

    fn run(&mut self, events: &Receiver<notify::Result<Event>>, trigger: &Trigger) {
        while let Ok(event) = events.recv() {
            let Some(first) = self.changed_file(event) else {
                continue;
            };
            // Let the burst settle, so the new process starts on a complete checkout.
            let started = Instant::now();
            let mut more = 0;
            while started.elapsed() < BURST_LIMIT {
                match events.recv_timeout(QUIET) {
                    Ok(event) => more += usize::from(self.changed_file(event).is_some()),
                    Err(RecvTimeoutError::Timeout) => break,
                    Err(RecvTimeoutError::Disconnected) => return,
                }
            }
            let others = if more > 0 {
                format!(" (and {more} more changes)")
            } else {
                String::new()
            };
            if let Some(Err(why)) = self.can_restart.map(|check| check()) {
                tracing::error!(
                    "{} changed{others}, but the process cannot restart: {why}; still serving",
                    first.display()
                );
                continue;
            }
            tracing::info!(
                "{} changed{others}: restarting after the requests in flight finish",
                first.display()
            );
            trigger.fire(Reason::Restart);
            return;
        }
    }

    /// The first file of `event` that restarts the process, watching any new folders on the way.
    fn changed_file(&mut self, event: notify::Result<Event>) -> Option<PathBuf> {
        let event = match event {
            Ok(event) => event,
            Err(e) => {
                if self.logged_errors.insert(e.to_string()) {
                    tracing::warn!("file watcher error: {e} (logged once)");
                }
                return None;
            }
        };
        if event.need_rescan() {
            return Some(PathBuf::from(
                "(event queue overflowed: changes may have been missed)",
            ));
        }
        if matches!(event.kind, EventKind::Access(_)) {
            return None;
        }
        let mut found = None;
        for path in &event.paths {
            if matches!(event.kind, EventKind::Create(_)) && path.is_dir() {
                let files = self.add_tree(path);
                found = found.or_else(|| files.iter().find_map(|f| self.restarts(f)));
            }
            found = found.or_else(|| self.restarts(path));
        }
        found
    }
}

fn is_watch_limit(error: &notify::Error) -> bool {
    match &error.kind {
        notify::ErrorKind::MaxFilesWatch => true,
        // inotify_add_watch reports the limit as ENOSPC.
        notify::ErrorKind::Io(e) => e.raw_os_error() == Some(28),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn default() -> Regex {
        compile_pattern(DEFAULT_RESTART_REGEX).expect("default compiles")
    }

    #[test]
    fn default_pattern_matches_python_and_config_files() {
        let regex = default();
        assert!(matches(&regex, Path::new("app.py")));
        assert!(matches(&regex, Path::new("pkg/sub/views.py")));
        assert!(matches(&regex, Path::new("web.config")));
        assert!(!matches(&regex, Path::new("notes.txt")));
        assert!(!matches(&regex, Path::new("module.pyc")));
    }

    #[test]
    fn anchored_at_the_start_like_re_match() {
        let regex = compile_pattern(r"src").expect("compiles");
        assert!(
            matches(&regex, Path::new("src/app.py")),
            "not anchored at the end"
        );
        assert!(
            !matches(&regex, Path::new("lib/src/app.py")),
            "anchored at the start"
        );
        let alternation = compile_pattern(r"a\.py|b\.py").expect("compiles");
        assert!(
            !matches(&alternation, Path::new("x/b.py")),
            "the anchor covers every branch"
        );
    }

    #[test]
    fn both_separators_are_tried() {
        let windows = compile_pattern(r"app\\.*\.py$").expect("compiles");
        let unix = compile_pattern(r"app/.*\.py$").expect("compiles");
        let path = Path::new("app/views.py");
        assert!(matches(&windows, path));
        assert!(matches(&unix, path));
    }

    #[test]
    fn look_around_is_refused() {
        assert!(compile_pattern(r".*(?<!test)\.py$").is_err());
    }

    #[test]
    fn skipped_folders() {
        assert!(is_skipped(Path::new("__pycache__/app.cpython-311.pyc")));
        assert!(is_skipped(Path::new("pkg/.git/HEAD")));
        assert!(is_skipped(Path::new("web/node_modules/x.config")));
        assert!(!is_skipped(Path::new("pkg/app.py")));
    }
}
