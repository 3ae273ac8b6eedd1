//! A TCP relay that adds latency: this kernel has no netem, so a test that
//! needs a slow path (a satellite link to etcd) routes that traffic through
//! here. Every chunk is forwarded `delay` after it arrived, in order, each
//! way; the delay can change while connections are open.
//!
//! Plain threads (two per connection): the traffic is an agent's few etcd
//! connections, and the harness stays free of any async runtime.

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

/// How often blocked threads look at the stop flag.
const POLL: Duration = Duration::from_millis(100);

pub struct Relay {
    listen: SocketAddr,
    delay_ms: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    acceptor: Option<thread::JoinHandle<()>>,
}

impl Relay {
    /// Listens on `listen` (in the calling thread's network namespace) and
    /// forwards every connection to `target`.
    pub fn start(listen: SocketAddr, target: SocketAddr) -> io::Result<Relay> {
        let listener = TcpListener::bind(listen)?;
        listener.set_nonblocking(true)?;
        let delay_ms = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let acceptor = {
            let (delay_ms, stop) = (delay_ms.clone(), stop.clone());
            thread::spawn(move || accept_loop(listener, target, delay_ms, stop))
        };
        Ok(Relay {
            listen,
            delay_ms,
            stop,
            acceptor: Some(acceptor),
        })
    }

    pub fn address(&self) -> SocketAddr {
        self.listen
    }

    /// Latency added to each direction from now on.
    pub fn set_delay(&self, delay: Duration) {
        self.delay_ms
            .store(delay.as_millis() as u64, Ordering::Relaxed);
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(acceptor) = self.acceptor.take() {
            let _ = acceptor.join();
        }
    }
}

fn accept_loop(
    listener: TcpListener,
    target: SocketAddr,
    delay_ms: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
) {
    while !stop.load(Ordering::Relaxed) {
        match listener.accept() {
            Ok((client, _)) => {
                let Ok(server) = TcpStream::connect_timeout(&target, Duration::from_secs(2)) else {
                    continue;
                };
                let _ = client.set_nonblocking(false);
                for (from, to) in [
                    (client.try_clone(), server.try_clone()),
                    (server.try_clone(), client.try_clone()),
                ] {
                    if let (Ok(from), Ok(to)) = (from, to) {
                        let (delay_ms, stop) = (delay_ms.clone(), stop.clone());
                        thread::spawn(move || pipe(from, to, delay_ms, stop));
                    }
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                thread::sleep(Duration::from_millis(20))
            }
            Err(_) => thread::sleep(POLL),
        }
    }
}

/// One direction: a reader queues each chunk with its due time, a writer
/// sends it when due, so that latency does not throttle throughput.
fn pipe(mut from: TcpStream, to: TcpStream, delay_ms: Arc<AtomicU64>, stop: Arc<AtomicBool>) {
    let (tx, rx) = mpsc::sync_channel::<(Instant, Vec<u8>)>(1024);
    let writer = {
        let stop = stop.clone();
        let mut to = to;
        thread::spawn(move || {
            while let Ok((due, chunk)) = rx.recv() {
                let wait = due.saturating_duration_since(Instant::now());
                if !wait.is_zero() {
                    thread::sleep(wait);
                }
                if stop.load(Ordering::Relaxed) || to.write_all(&chunk).is_err() {
                    break;
                }
            }
            let _ = to.shutdown(Shutdown::Write);
        })
    };
    let _ = from.set_read_timeout(Some(POLL));
    let mut buffer = vec![0u8; 16 * 1024];
    while !stop.load(Ordering::Relaxed) {
        match from.read(&mut buffer) {
            Ok(0) => break,
            Ok(n) => {
                let due = Instant::now() + Duration::from_millis(delay_ms.load(Ordering::Relaxed));
                if tx.send((due, buffer[..n].to_vec())).is_err() {
                    break;
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) => {}
            Err(_) => break,
        }
    }
    drop(tx);
    let _ = writer.join();
    let _ = from.shutdown(Shutdown::Read);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forwards_in_order_and_adds_the_delay() {
        let server = TcpListener::bind("127.0.0.1:0").unwrap();
        let target = server.local_addr().unwrap();
        let echo = thread::spawn(move || {
            let (mut s, _) = server.accept().unwrap();
            let mut buf = [0u8; 1024];
            loop {
                match s.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => s.write_all(&buf[..n]).unwrap(),
                }
            }
        });
        let port = crate::free_port();
        let relay = Relay::start(SocketAddr::from(([127, 0, 0, 1], port)), target).unwrap();
        let mut client = TcpStream::connect(relay.address()).unwrap();
        client.write_all(b"fast").unwrap();
        let mut got = [0u8; 4];
        client.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"fast");
        relay.set_delay(Duration::from_millis(150));
        let sent = Instant::now();
        client.write_all(b"slow").unwrap();
        client.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"slow");
        // Both ways delayed: at least two delays for the round trip.
        assert!(
            sent.elapsed() >= Duration::from_millis(300),
            "{:?}",
            sent.elapsed()
        );
        drop(client);
        drop(relay);
        echo.join().unwrap();
    }
}
