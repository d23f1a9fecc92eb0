//! Real web servers in front of the binary, for the test files that need them: a server process
//! stopped when dropped, nginx passing to the gateway, and an HTTP client.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A server process stopped (and reaped) when dropped.
pub struct Server(pub Child);

impl Drop for Server {
    fn drop(&mut self) {
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Whether `program` is installed; when not, says on stderr (past the test harness's capture,
/// so it shows in the cargo run) that `test` is skipped and why.
pub fn installed(program: &str, test: &str) -> bool {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let found = std::env::split_paths(&path)
        .chain(["/usr/sbin".into(), "/sbin".into()])
        .any(|dir| {
            use std::os::unix::fs::PermissionsExt;
            std::fs::metadata(dir.join(program))
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        });
    if !found {
        let _ = writeln!(
            std::io::stderr(),
            "\nSKIPPED {test}: {program} is not installed (scripts/test installs it when run as root)"
        );
    }
    found
}

pub fn start(program: &str, args: &[&str]) -> Server {
    let child = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {program}: {e}"));
    Server(child)
}

pub fn wait_for_port(port: u16) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "nothing listens on port {port}");
        std::thread::sleep(Duration::from_millis(25));
    }
}

pub fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(60)))
        .build()
        .into()
}

pub struct Reply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Reply {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn cookie(&self, name: &str) -> String {
        self.headers
            .iter()
            .filter(|(k, _)| k.eq_ignore_ascii_case("set-cookie"))
            .find_map(|(_, v)| v.strip_prefix(&format!("{name}=")))
            .and_then(|v| v.split(';').next())
            .unwrap_or_else(|| panic!("no {name} cookie"))
            .to_owned()
    }
}

pub fn reply(result: Result<ureq::http::Response<ureq::Body>, ureq::Error>) -> Reply {
    let mut response = result.expect("HTTP request");
    let status = response.status().as_u16();
    let headers = response
        .headers()
        .iter()
        .map(|(k, v)| {
            (
                k.to_string(),
                String::from_utf8_lossy(v.as_bytes()).into_owned(),
            )
        })
        .collect();
    let body = response
        .body_mut()
        .with_config()
        .limit(64 * 1024 * 1024)
        .read_to_vec()
        .expect("body");
    Reply {
        status,
        headers,
        body,
    }
}

pub fn get(agent: &ureq::Agent, url: &str) -> Reply {
    reply(agent.get(url).call())
}

pub fn post(agent: &ureq::Agent, url: &str, headers: &[(&str, &str)], body: &[u8]) -> Reply {
    let mut request = agent.post(url);
    for (k, v) in headers {
        request = request.header(*k, *v);
    }
    reply(request.send(body))
}

pub fn venv() -> PathBuf {
    PathBuf::from(std::env::var_os("WFASTCGI_TEST_VENV").expect(
        "WFASTCGI_TEST_VENV is not set: run the tests with scripts/test, which makes the venv with Django",
    ))
}

pub const FASTCGI_PARAMS: &str = "
            fastcgi_param REQUEST_METHOD $request_method;
            fastcgi_param REQUEST_URI $request_uri;
            fastcgi_param QUERY_STRING $query_string;
            fastcgi_param CONTENT_TYPE $content_type;
            fastcgi_param CONTENT_LENGTH $content_length;
            fastcgi_param SCRIPT_NAME $fastcgi_script_name;
            fastcgi_param SERVER_PROTOCOL $server_protocol;
            fastcgi_param SERVER_NAME $server_name;
            fastcgi_param SERVER_PORT $server_port;
            fastcgi_param SERVER_SOFTWARE nginx/$nginx_version;
            fastcgi_param REMOTE_ADDR $remote_addr;
            fastcgi_param HTTP_HOST $host;
            # The README's fix for Debian's stock line above, which drops the port.
            fastcgi_param HTTP_HOST $host:$server_port;";

/// nginx on `port` passing everything to `upstream` (`127.0.0.1:P` or `unix:/path`), with
/// `extra` directives in its location.
pub fn nginx(dir: &Path, port: u16, upstream: &str, keep_conn: bool, extra: &str) -> Server {
    let run = dir.join("nginx");
    std::fs::create_dir_all(&run).expect("mkdir");
    // As root the workers would run as nobody and could not reach a 0660 socket.
    let user = if unsafe { libc::geteuid() } == 0 {
        "user root;"
    } else {
        ""
    };
    let keep = if keep_conn {
        "fastcgi_keep_conn on;"
    } else {
        ""
    };
    let upstream_block = if keep_conn {
        format!("upstream gateway {{ server {upstream}; keepalive 8; }}")
    } else {
        format!("upstream gateway {{ server {upstream}; }}")
    };
    let config = format!(
        "{user}
        worker_processes 1;
        daemon off;
        pid {run}/nginx.pid;
        error_log {run}/error.log;
        events {{ worker_connections 1024; }}
        http {{
            access_log off;
            client_body_temp_path {run}/body;
            fastcgi_temp_path {run}/fastcgi;
            proxy_temp_path {run}/proxy;
            uwsgi_temp_path {run}/uwsgi;
            scgi_temp_path {run}/scgi;
            client_max_body_size 100m;
            {upstream_block}
            server {{
                listen 127.0.0.1:{port};
                location / {{
                    fastcgi_pass gateway;
                    {keep}
                    {extra}
                    {FASTCGI_PARAMS}
                }}
            }}
        }}",
        run = run.display()
    );
    let path = run.join("nginx.conf");
    std::fs::write(&path, config).expect("write nginx.conf");
    let server = start(
        "nginx",
        &["-p", &run.to_string_lossy(), "-c", &path.to_string_lossy()],
    );
    wait_for_port(port);
    server
}
