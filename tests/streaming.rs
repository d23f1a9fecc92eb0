//! Bodies streamed both ways in bounded memory: uploads, downloads, wsgi.file_wrapper, spooling
//! and aborts. Memory is checked through the gateway's peak RSS (VmHWM), never through timing.

mod common;

use std::io::Read;
use std::time::Duration;

use common::*;
use wfastcgi::protocol::{self, Record};

/// The ceiling the streaming issue sets for the whole process, Python included.
const CEILING_MIB: f64 = 64.0;
const BIG: usize = 256 * 1024 * 1024;

#[test]
fn a_big_upload_is_streamed_in_bounded_memory() {
    let app = AppDir::new("echo.app", &[]);
    let mut gateway = Gateway::iis(&[]);
    let mut client = gateway.client();
    let mut params = app.iis_params("POST", "/upload");
    set_param(&mut params, "CONTENT_LENGTH", &BIG.to_string());
    let writer = client.stream.try_clone().expect("clone");
    let sender = stream_upload(writer, &params, BIG);
    let response = client.read_response(1);
    sender.join().expect("sender");
    let json = response.json();
    assert_eq!(json["length"], BIG);
    assert_eq!(json["sha256"], upload_sha256(BIG).as_str());
    let peak = peak_rss_mib(gateway.child.id());
    assert!(
        peak <= CEILING_MIB,
        "peak RSS {peak:.1} MiB for a 256 MiB upload"
    );
}

#[test]
fn a_big_download_and_a_slow_reader_stay_in_bounded_memory() {
    let app = AppDir::new("stream.app", &[]);
    let mut gateway = Gateway::iis(&[]);
    let mut client = gateway.client();
    let n = BIG / 65536;
    client.send(&Send::new(
        1,
        &app.iis_params("GET", &format!("/?n={n}&size=65536")),
    ));
    // The first 8 MiB slowly: the application must wait, not pile up output. Then full speed.
    let mut body = 0usize;
    let mut slow_peak = 0.0;
    loop {
        match client.read_record() {
            Some(Record::Stdout { content, .. }) => body += content.len(),
            Some(Record::EndRequest { .. }) => break,
            Some(other) => panic!("unexpected {other:?}"),
            None => panic!("closed early"),
        }
        if body < 8 * 1024 * 1024 {
            std::thread::sleep(Duration::from_millis(2));
            slow_peak = peak_rss_mib(gateway.child.id());
        }
    }
    assert!(body >= BIG, "{body} bytes");
    let peak = peak_rss_mib(gateway.child.id());
    assert!(
        slow_peak <= CEILING_MIB,
        "peak RSS {slow_peak:.1} MiB with a slow reader"
    );
    assert!(
        peak <= CEILING_MIB,
        "peak RSS {peak:.1} MiB for a 256 MiB download"
    );
}

#[test]
fn file_wrapper_sends_real_files_and_falls_back_for_others() {
    let app = AppDir::new("stream.files", &[]);
    let data = bytes_of(3_000_001, 9);
    let path = app.path().join("data.bin");
    std::fs::write(&path, &data).expect("write");
    let mut gateway = Gateway::iis(&[]);
    let mut client = gateway.client();
    let url = |extra: &str| format!("/?path={}{extra}", path.display());
    let cases: [(&str, &[u8]); 4] = [
        ("", &data),
        ("&length=1000", &data[..1000]),
        ("&blksize=1000", &data),
        ("&kind=bytesio&blksize=4096", &data),
    ];
    for (id, (extra, expected)) in cases.iter().enumerate() {
        let response = client.get(id as u16 + 1, &app.iis_params("GET", &url(extra)));
        assert_eq!(response.status, 200, "{extra}: {}", response.stderr_text());
        assert_eq!(response.body.len(), expected.len(), "{extra}");
        assert!(response.body == *expected, "{extra}: content differs");
    }
    // close() once per real file (the BytesIO case is not counted).
    assert_eq!(client.get(9, &app.iis_params("GET", "/count")).text(), "3");

    let big = app.path().join("big.bin");
    let file = std::fs::File::create(&big).expect("create");
    file.set_len(BIG as u64).expect("sparse file");
    let response = client.get(
        10,
        &app.iis_params("GET", &format!("/?path={}", big.display())),
    );
    assert_eq!(response.body.len(), BIG);
    let peak = peak_rss_mib(gateway.child.id());
    assert!(
        peak <= CEILING_MIB,
        "peak RSS {peak:.1} MiB for a 256 MiB file"
    );
}

#[test]
fn spooling_makes_the_body_seekable() {
    let app = AppDir::new("echo.seek_app", &[("WSGI_INPUT_SPOOL", "1000")]);
    let mut gateway = Gateway::iis(&[]);
    let mut client = gateway.client();
    for (id, len) in [(1u16, 10usize), (2, 100_000)] {
        let body = bytes_of(len, id as u64);
        let mut params = app.iis_params("POST", "/");
        set_param(&mut params, "CONTENT_LENGTH", &len.to_string());
        let mut request = Send::new(id, &params).body(&body);
        request.stdin_record = 777;
        let json = client.request(&request).json();
        assert_eq!(json["seekable"], true);
        assert_eq!(json["length"], len);
        assert_eq!(json["tell"], len);
        assert_eq!(
            json["again_length"], len,
            "read again after seek(0), seek(-2, 1)"
        );
        assert_eq!(json["sha256"], sha256_hex(&body));
        assert_eq!(json["again_sha256"], sha256_hex(&body));
    }
    // Without spooling the body is a stream.
    let app = AppDir::new("echo.seek_app", &[]);
    let mut gateway = Gateway::iis(&[]);
    let mut params = app.iis_params("POST", "/");
    set_param(&mut params, "CONTENT_LENGTH", "5");
    let json = gateway
        .client()
        .request(&Send::new(1, &params).body(b"hello"))
        .json();
    assert_eq!(json["seekable"], false);
    assert!(json["error"]
        .as_str()
        .expect("error")
        .contains("WSGI_INPUT_SPOOL"));
}

#[test]
fn aborts_mid_upload_and_mid_download() {
    // Mid-upload: the application blocked in wsgi.input.read() is woken with an error.
    let app = AppDir::new("echo.app", &[]);
    let mut gateway = Gateway::iis(&[]);
    let mut client = gateway.client();
    let mut params = app.iis_params("POST", "/");
    set_param(&mut params, "CONTENT_LENGTH", "1000000");
    let whole =
        Client::<std::os::unix::net::UnixStream>::encode(&Send::new(1, &params).body(&[7u8; 1000]));
    client.write_raw(&whole[..whole.len() - protocol::HEADER_LEN]);
    std::thread::sleep(Duration::from_millis(200));
    client.abort(1);
    let response = client.read_response(1);
    assert_eq!(response.protocol_status, 0);
    assert!(app
        .wait_for_log("request body incomplete")
        .contains("request body incomplete"));
    let mut params = app.iis_params("POST", "/");
    set_param(&mut params, "CONTENT_LENGTH", "3");
    assert_eq!(
        client.request(&Send::new(2, &params).body(b"abc")).json()["length"],
        3
    );

    // Mid-download, the web server closes the connection: the generator is closed.
    let app = AppDir::new("stream.tracked_stream", &[]);
    let gateway = Gateway::bind(Address::Tcp(any_port()), app.path(), &[]);
    let mut client = gateway.connect();
    client.send(&Send::new(1, &app.iis_params("GET", "/")));
    let mut buf = vec![0u8; 1024 * 1024];
    client
        .stream
        .read_exact(&mut buf)
        .expect("some of the body");
    drop(client);
    let log = app.wait_for_log("closed the connection");
    assert!(log.contains("response stopped"), "{log}");
    let mut client = gateway.connect();
    assert_eq!(client.get(1, &app.iis_params("GET", "/count")).text(), "1");
}

/// The web server closes cleanly mid-download, having read all it was sent (nginx buffering the
/// response): the connection sees the end of its stream, no failed write, and the generator is
/// closed all the same.
#[test]
fn a_web_server_closing_cleanly_mid_download_closes_the_generator() {
    let app = AppDir::new("stream.tracked_stream", &[]);
    let socket = app.path().join("closing.sock");
    let gateway = Gateway::bind(Address::Unix(socket.clone()), app.path(), &[]);
    let stream = std::os::unix::net::UnixStream::connect(&socket).expect("connect");
    let mut client = Client::new(stream.try_clone().expect("clone"));
    client.send(&Send::new(1, &app.iis_params("GET", "/")));
    for _ in 0..4 {
        client.read_record().expect("some of the body");
    }
    // Half-closed and still reading, so no write of the gateway's fails.
    stream
        .shutdown(std::net::Shutdown::Write)
        .expect("shut down the sending side");
    let reader = std::thread::spawn(move || while client.read_record().is_some() {});
    let log = app.wait_for_log("closed the connection");
    assert!(log.contains("response stopped"), "{log}");
    reader.join().expect("the gateway closed the connection");
    let mut client = gateway.connect();
    assert_eq!(client.get(1, &app.iis_params("GET", "/count")).text(), "1");
}

/// PEP 3333: no block may be delayed. The chunk that completes a declared Content-Length
/// reaches the web server while the generator is still running, not with END_REQUEST after it
/// ends: the client sees the whole body, then releases the generator, and only then gets
/// END_REQUEST.
#[test]
fn the_last_chunk_is_not_held_until_the_iterable_ends() {
    let app = AppDir::new("stream.works_after_last_chunk", &[]);
    let flag = app.path().join("release");
    let mut gateway = Gateway::iis(&[]);
    let mut client = gateway.client();
    let url = format!("/?flag={}", flag.display());
    client.send(&Send::new(1, &app.iis_params("GET", &url)));
    let mut stdout = Vec::new();
    while !stdout.ends_with(b"hello") {
        match client.read_record() {
            Some(Record::Stdout { content, .. }) => stdout.extend_from_slice(&content),
            other => panic!(
                "{other:?} before the whole body arrived: the last chunk waited for the generator"
            ),
        }
    }
    std::fs::write(&flag, b"").expect("release the generator");
    let rest = client.read_response(1);
    assert!(rest.body.is_empty(), "{rest:?}");
    assert!(
        app.wait_for_log("stdout: \"released\"")
            .contains("stdout: \"released\""),
        "{}",
        app.log()
    );
}
