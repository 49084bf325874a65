// Experiment (docs/proxy-benchmark.md, "Echo latency beyond the p99"): where the rare 1-10 ms
// round trips come from. One blocking client sends 64 bytes and waits for them, N times, on one
// tunnel, directly to an echo server and through HAProxy (forced splice, fixed target) and ours
// (CONNECT), in turn; prints p10/p50/p99/p99.9/max and how many round trips took over 1 ms.
// The direct connection has as many slow ones as the proxies: they are the machine's.
//   hack/experiments/echo-tail.sh [rounds] [round trips]
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::Instant;

// echo-tail serve PORT | echo-tail run ADDR raw|connect TARGET N
fn main() {
    let a: Vec<String> = std::env::args().collect();
    if a[1] == "serve" {
        let listener = TcpListener::bind(format!("127.0.0.1:{}", a[2])).unwrap();
        for s in listener.incoming() {
            let mut s = s.unwrap();
            std::thread::spawn(move || {
                s.set_nodelay(true).unwrap();
                let mut b = [0u8; 4096];
                loop {
                    let n = s.read(&mut b).unwrap_or(0);
                    if n == 0 || s.write_all(&b[..n]).is_err() {
                        return;
                    }
                }
            });
        }
        return;
    }
    let n: usize = a[5].parse().unwrap();
    let mut s = TcpStream::connect(&a[2]).unwrap();
    s.set_nodelay(true).unwrap();
    if a[3] == "connect" {
        s.write_all(format!("CONNECT {0} HTTP/1.0\r\nHost: {0}\r\n\r\n", a[4]).as_bytes()).unwrap();
        let (mut head, mut b) = (Vec::new(), [0u8; 512]);
        while !head.ends_with(b"\r\n\r\n") {
            let k = s.read(&mut b).unwrap();
            assert!(k > 0, "closed before replying");
            head.extend_from_slice(&b[..k]);
        }
        assert!(head.starts_with(b"HTTP/1.0 200"), "{}", String::from_utf8_lossy(&head));
    }
    let (msg, mut back) = ([7u8; 64], [0u8; 64]);
    let mut lat = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        s.write_all(&msg).unwrap();
        s.read_exact(&mut back).unwrap();
        lat.push(t.elapsed().as_secs_f64() * 1e6);
    }
    lat.sort_by(|x, y| x.partial_cmp(y).unwrap());
    let p = |q: f64| lat[((lat.len() as f64 * q) as usize).min(lat.len() - 1)];
    let over = |us: f64| lat.iter().filter(|&&d| d > us).count();
    println!("n={n} p10={:.0} p50={:.0} p99={:.0} p99.9={:.0} max={:.0} µs, over 1 ms: {}", p(0.1), p(0.5), p(0.99), p(0.999), lat[n - 1], over(1000.0));
}
