//! The reference service (`cache-rollout serve`) in a real process on a free loopback port.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

pub const BIN: &str = env!("CARGO_BIN_EXE_cache-rollout");
pub const TOKEN: &str = "binary-test-token-0123456789";

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A `cache-rollout` command with none of the product's variables inherited from the test's environment.
pub fn command() -> Command {
    command_for(BIN)
}

/// `program` with none of the product's variables inherited from the test's environment, run in `target/tmp`.
pub fn command_for(program: impl AsRef<std::ffi::OsStr>) -> Command {
    let mut c = Command::new(program);
    for v in [
        "APP_ENV",
        "FEATURE_CACHE",
        "CACHE_IMPL",
        "CACHE_PATTERNS",
        "REDIS_URL",
        "CACHE_ADMIN_TOKEN",
        "BIND_ADDR",
    ] {
        c.env_remove(v);
    }
    c.env("RUST_LOG", "info");
    // Not the repository: a developer's `.env` there would fill in the variables removed above. Every test names its
    // configuration directory.
    c.current_dir(env!("CARGO_TARGET_TMPDIR"));
    c
}

/// A configuration directory holding the shipped `config/default.toml` and a `development.toml` of `overrides`
/// (removed when dropped).
pub fn config_with(overrides: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::copy(
        repo().join("config/default.toml"),
        dir.path().join("default.toml"),
    )
    .expect("copy default.toml");
    std::fs::write(dir.path().join("development.toml"), overrides).expect("write development.toml");
    dir
}

pub struct Service {
    pub child: Child,
    pub base: String,
    log: Arc<Mutex<String>>,
}

impl Service {
    /// Starts `cache-rollout serve --config-dir CONFIG_DIR` with the given variables, and waits for `/health`.
    pub fn start(config_dir: &Path, env: &[(&str, &str)]) -> Service {
        Self::start_with(config_dir, env, &[])
    }

    /// As [`Service::start`], with more `serve` arguments (`--users`, `--origin-delay-ms`).
    pub fn start_with(config_dir: &Path, env: &[(&str, &str)], args: &[&str]) -> Service {
        let mut cmd = command();
        cmd.arg("serve")
            .arg("--config-dir")
            .arg(config_dir)
            .args(args);
        for (k, v) in env {
            cmd.env(k, v);
        }
        Self::launch(cmd)
    }

    /// Runs `cmd` (any HTTP service that reads `BIND_ADDR` and answers `/health`) on a free port, collecting its
    /// stderr, and waits for `/health`.
    pub fn launch(mut cmd: Command) -> Service {
        let port = super::free_port();
        cmd.env("BIND_ADDR", format!("127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("start the service");
        let log = Arc::new(Mutex::new(String::new()));
        let stderr = child.stderr.take().expect("stderr");
        let sink = Arc::clone(&log);
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let mut l = sink.lock().expect("log");
                l.push_str(&line);
                l.push('\n');
            }
        });
        let s = Service {
            child,
            base: format!("http://127.0.0.1:{port}"),
            log,
        };
        s.wait_for(
            || s.try_get("/health").is_some(),
            "the service to answer /health",
        );
        s
    }

    pub fn wait_for(&self, mut ok: impl FnMut() -> bool, what: &str) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !ok() {
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}; log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn log(&self) -> String {
        self.log.lock().expect("log").clone()
    }

    pub fn request(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> Option<(u16, Value, String)> {
        let client = reqwest::blocking::Client::builder()
            .timeout(Duration::from_secs(5))
            .build()
            .ok()?;
        let mut req = client
            .request(method, format!("{}{path}", self.base))
            .bearer_auth(TOKEN);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().ok()?;
        let status = resp.status().as_u16();
        let text = resp.text().ok()?;
        Some((
            status,
            serde_json::from_str(&text).unwrap_or(Value::Null),
            text,
        ))
    }

    /// `PUT /internal/cache/config` with the admin token; asserts 200 and returns the state it answers.
    pub fn put_config(&self, body: Value) -> Value {
        let (status, state, text) = self
            .request(
                reqwest::Method::PUT,
                "/internal/cache/config",
                Some(body.clone()),
            )
            .unwrap_or_else(|| panic!("PUT {body} failed; log:\n{}", self.log()));
        assert_eq!(status, 200, "PUT {body}: {text}");
        state
    }

    pub fn try_get(&self, path: &str) -> Option<(u16, Value, String)> {
        self.request(reqwest::Method::GET, path, None)
    }

    pub fn get(&self, path: &str) -> (u16, Value, String) {
        self.try_get(path)
            .unwrap_or_else(|| panic!("GET {path} failed; log:\n{}", self.log()))
    }

    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .arg(sig)
            .arg(self.child.id().to_string())
            .status();
        assert!(matches!(ok, Ok(s) if s.success()), "kill {sig}");
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
