//! A health probe as a command: one `GET` to the process's own HTTP endpoint, answered by
//! an exit status. Images run it as their `HEALTHCHECK` (`gantry-dispatcher probe`,
//! `gantry-registry --probe`), so they need no HTTP client such as curl, and no shell.
//! Plain HTTP/1.1 over loopback, blocking, bounded by one timeout.

use std::io::{self, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

/// The longest answer read: the probes answer a line or a small JSON document.
const MAX_ANSWER: u64 = 64 * 1024;

/// The address to probe a server bound to `bound` at: the same port on loopback when it is
/// bound to every interface (`0.0.0.0`, `[::]`), else the address itself.
pub fn target(bound: SocketAddr) -> SocketAddr {
    let ip = match bound.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    SocketAddr::new(ip, bound.port())
}

/// `GET path` of the server at `addr`, all of it within `timeout`: the status code and the
/// body (lossily UTF-8, trimmed).
///
/// # Errors
/// Nothing listens, the connection fails or times out, or the answer is not HTTP.
pub fn get(addr: SocketAddr, path: &str, timeout: Duration) -> io::Result<(u16, String)> {
    let deadline = Instant::now() + timeout;
    let left = || {
        deadline
            .checked_duration_since(Instant::now())
            .filter(|d| !d.is_zero())
            .ok_or_else(|| io::Error::new(io::ErrorKind::TimedOut, "no answer in time"))
    };
    let mut stream = TcpStream::connect_timeout(&addr, left()?)?;
    stream.set_write_timeout(Some(left()?))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: gantry-probe\r\nConnection: close\r\n\r\n"
    )?;
    let mut answer = Vec::new();
    let mut limited = (&mut stream).take(MAX_ANSWER);
    let mut chunk = [0u8; 4096];
    loop {
        limited.get_ref().set_read_timeout(Some(left()?))?;
        match limited.read(&mut chunk)? {
            0 => break,
            n => answer.extend_from_slice(&chunk[..n]),
        }
    }
    parse(&answer)
}

/// The status and body of an HTTP/1.x answer.
fn parse(answer: &[u8]) -> io::Result<(u16, String)> {
    let text = String::from_utf8_lossy(answer);
    let not_http = || {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "the answer is not HTTP: {:?}",
                text.chars().take(80).collect::<String>()
            ),
        )
    };
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status_line = head.lines().next().ok_or_else(not_http)?;
    let mut words = status_line.split_whitespace();
    let status = match (words.next(), words.next()) {
        (Some(version), Some(code)) if version.starts_with("HTTP/1.") => {
            code.parse::<u16>().map_err(|_| not_http())?
        }
        _ => return Err(not_http()),
    };
    Ok((status, body.trim().to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    #[test]
    fn every_interface_is_probed_on_loopback() {
        let any: SocketAddr = "0.0.0.0:8380".parse().unwrap();
        assert_eq!(target(any).to_string(), "127.0.0.1:8380");
        let any6: SocketAddr = "[::]:8080".parse().unwrap();
        assert_eq!(target(any6).to_string(), "[::1]:8080");
        let one: SocketAddr = "10.0.0.7:8380".parse().unwrap();
        assert_eq!(target(one), one);
    }

    #[test]
    fn the_status_and_body_of_a_served_answer() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let server = std::thread::spawn(move || {
            let (mut conn, _) = listener.accept().unwrap();
            let mut request = [0u8; 1024];
            let n = conn.read(&mut request).unwrap();
            let request = String::from_utf8_lossy(&request[..n]).into_owned();
            conn.write_all(
                b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 9\r\n\r\nstarting\n",
            )
            .unwrap();
            request
        });
        let (status, body) = get(addr, "/readyz", Duration::from_secs(5)).unwrap();
        assert_eq!((status, body.as_str()), (503, "starting"));
        assert!(
            server
                .join()
                .unwrap()
                .starts_with("GET /readyz HTTP/1.1\r\n")
        );
    }

    #[test]
    fn nothing_listening_and_garbage_are_errors() {
        let free = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        assert!(get(free, "/livez", Duration::from_secs(2)).is_err());
        assert!(parse(b"SSH-2.0-OpenSSH\r\n").is_err());
        assert_eq!(
            parse(b"HTTP/1.0 200 OK\r\n\r\nok").unwrap(),
            (200, "ok".into())
        );
    }
}
