//! A TCP proxy on loopback that a test can cut and restore: a broker outage staged in front
//! of a broker that stays up (DESIGN.md section 7), with the broker advertising the proxy's
//! port so that every client connection goes through it.
#![allow(dead_code)]

use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

/// A running proxy; its threads end with the test process.
pub struct Proxy {
    /// The port clients connect to.
    pub port: u16,
    /// False while cut: new connections are closed at once, no bytes pass.
    up: Arc<AtomicBool>,
    /// Both ends of every forwarded connection, to close them all on a cut.
    live: Arc<Mutex<Vec<TcpStream>>>,
    /// Where connections go, once set.
    target: Arc<Mutex<Option<SocketAddr>>>,
}

impl Proxy {
    /// Listens on a free loopback port and forwards to `target` once it is set with
    /// [`Proxy::forward_to`] (the broker starts after the proxy, since it advertises it).
    pub fn start() -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the proxy");
        let port = listener.local_addr().unwrap().port();
        let proxy = Proxy {
            port,
            up: Arc::new(AtomicBool::new(false)),
            live: Arc::new(Mutex::new(Vec::new())),
            target: Arc::new(Mutex::new(None)),
        };
        let (up, live, target) = (proxy.up.clone(), proxy.live.clone(), proxy.target.clone());
        std::thread::spawn(move || {
            for client in listener.incoming().flatten() {
                let to = *target.lock().unwrap();
                let (Some(to), true) = (to, up.load(Ordering::SeqCst)) else {
                    let _ = client.shutdown(Shutdown::Both);
                    continue;
                };
                let Ok(server) = TcpStream::connect(to) else {
                    let _ = client.shutdown(Shutdown::Both);
                    continue;
                };
                let _ = client.set_nodelay(true);
                let _ = server.set_nodelay(true);
                {
                    let mut live = live.lock().unwrap();
                    live.push(client.try_clone().unwrap());
                    live.push(server.try_clone().unwrap());
                }
                pump(client.try_clone().unwrap(), server.try_clone().unwrap());
                pump(server, client);
            }
        });
        proxy
    }

    /// Starts forwarding to `127.0.0.1:port`.
    pub fn forward_to(&self, port: u16) {
        *self.target.lock().unwrap() = Some(SocketAddr::from(([127, 0, 0, 1], port)));
        self.up.store(true, Ordering::SeqCst);
    }

    /// The outage begins: every open connection is closed and new ones are refused.
    pub fn cut(&self) {
        self.up.store(false, Ordering::SeqCst);
        for s in self.live.lock().unwrap().drain(..) {
            let _ = s.shutdown(Shutdown::Both);
        }
    }

    /// The outage ends: new connections are forwarded again.
    pub fn restore(&self) {
        self.up.store(true, Ordering::SeqCst);
    }
}

/// Copies bytes from `a` to `b` on a thread until either side closes, then closes both.
fn pump(mut a: TcpStream, mut b: TcpStream) {
    std::thread::spawn(move || {
        let _ = std::io::copy(&mut a, &mut b);
        let _ = a.shutdown(Shutdown::Both);
        let _ = b.shutdown(Shutdown::Both);
    });
}
