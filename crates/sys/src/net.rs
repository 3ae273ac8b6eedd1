//! Networking: local addresses, reads and half-closes on borrowed sockets,
//! a raw link-layer broadcast, network namespaces.

use crate::check;
use std::io;
use std::net::IpAddr;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};

/// Every IPv4 and IPv6 address on this host's interfaces (`getifaddrs`), in
/// the order the kernel lists them, duplicates kept; interfaces without an
/// address or with another family (packet, ...) are skipped.
pub fn local_ip_addresses() -> io::Result<Vec<IpAddr>> {
    let mut addresses = Vec::new();
    let mut list: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: `list` is a valid out-pointer; on success getifaddrs stores
    // the head of a list it allocated, walked read-only below and freed
    // exactly once at the end.
    check(unsafe { libc::getifaddrs(&mut list) })?;
    let mut entry = list;
    while !entry.is_null() {
        // SAFETY: a non-null node of the list getifaddrs returned, not yet
        // freed, not written to while this reference lives.
        let ifa = unsafe { &*entry };
        if !ifa.ifa_addr.is_null() {
            // SAFETY: a non-null ifa_addr points at a sockaddr, whose first
            // field is the family.
            let family = i32::from(unsafe { (*ifa.ifa_addr).sa_family });
            match family {
                libc::AF_INET => {
                    // SAFETY: the family says this sockaddr is a
                    // sockaddr_in, which the kernel filled in whole.
                    let sin = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in) };
                    addresses.push(IpAddr::from(
                        u32::from_be(sin.sin_addr.s_addr).to_be_bytes(),
                    ));
                }
                libc::AF_INET6 => {
                    // SAFETY: the family says this sockaddr is a
                    // sockaddr_in6, which the kernel filled in whole.
                    let sin6 = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in6) };
                    addresses.push(IpAddr::from(sin6.sin6_addr.s6_addr));
                }
                _ => {}
            }
        }
        entry = ifa.ifa_next;
    }
    // SAFETY: the list getifaddrs allocated, freed once; no reference into
    // it outlives this point.
    unsafe { libc::freeifaddrs(list) };
    Ok(addresses)
}

/// `shutdown(SHUT_WR)`: sends the end of the stream on a socket that stays
/// open for reading.
pub fn shutdown_write(socket: impl AsFd) -> io::Result<()> {
    let fd = socket.as_fd().as_raw_fd();
    // SAFETY: `fd` is a descriptor borrowed for the call, so open; shutdown
    // takes no pointer.
    check(unsafe { libc::shutdown(fd, libc::SHUT_WR) })
}

/// `read(2)` once into `buffer` from a borrowed descriptor (a non-blocking
/// socket answers `WouldBlock` when empty). Returns the bytes read, 0 at the
/// end of the stream.
pub fn read(fd: impl AsFd, buffer: &mut [u8]) -> io::Result<usize> {
    let raw = fd.as_fd().as_raw_fd();
    // SAFETY: `raw` is a descriptor borrowed for the call, so open; the
    // buffer is exclusively borrowed and valid for writes of its length,
    // which is all read(2) may write.
    let n = unsafe { libc::read(raw, buffer.as_mut_ptr().cast(), buffer.len()) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n as usize)
}

/// Sends `payload` once as a link-layer broadcast (destination
/// ff:ff:ff:ff:ff:ff) of protocol `ethertype` (`libc::ETH_P_ARP`, ...) on
/// interface `ifindex`, through an `AF_PACKET`/`SOCK_DGRAM` socket opened
/// and closed here (the kernel adds the Ethernet header). Needs
/// CAP_NET_RAW.
pub fn send_link_broadcast(ifindex: u32, ethertype: u16, payload: &[u8]) -> io::Result<()> {
    let protocol = ethertype.to_be();
    // SAFETY: socket(2) takes integers only.
    let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_DGRAM, i32::from(protocol)) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by socket(2) and nothing else owns it:
    // the OwnedFd closes it once, when dropped at the end of this function.
    let socket = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: `sockaddr_ll` is a C struct of integers and byte arrays, for
    // which all-zero bytes are a valid value.
    let mut to: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    to.sll_family = libc::AF_PACKET as u16;
    to.sll_protocol = protocol;
    to.sll_ifindex = ifindex as i32;
    to.sll_halen = 6;
    to.sll_addr[..6].copy_from_slice(&[0xff; 6]);
    // SAFETY: the socket is open; `payload` is valid for reads of its
    // length and `to` is a sockaddr_ll of the size passed, both alive for
    // the call; the kernel only reads them.
    let sent = unsafe {
        libc::sendto(
            socket.as_raw_fd(),
            payload.as_ptr().cast(),
            payload.len(),
            0,
            (&to as *const libc::sockaddr_ll).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as u32,
        )
    };
    if sent < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// `setns(fd, CLONE_NEWNET)`: moves the calling thread into the network
/// namespace `namespace` refers to (a `/run/netns/<name>` or
/// `/proc/<pid>/ns/net` file). Needs CAP_SYS_ADMIN.
pub fn enter_network_namespace(namespace: impl AsFd) -> io::Result<()> {
    let fd = namespace.as_fd().as_raw_fd();
    // SAFETY: `fd` is a descriptor borrowed for the call, so open; setns
    // takes no pointer and, for CLONE_NEWNET, affects only the calling
    // thread's view of the network.
    check(unsafe { libc::setns(fd, libc::CLONE_NEWNET) })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::net::{Ipv4Addr, TcpListener, TcpStream};

    #[test]
    fn loopback_is_a_local_address() {
        let addresses = local_ip_addresses().unwrap();
        assert!(
            addresses.contains(&IpAddr::V4(Ipv4Addr::LOCALHOST)),
            "{addresses:?}"
        );
    }

    #[test]
    fn read_and_half_close_on_a_borrowed_socket() {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let mut client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server, _) = listener.accept().unwrap();
        client.write_all(b"hello").unwrap();
        let mut buffer = [0u8; 16];
        let mut got = 0;
        while got < 5 {
            got += read(&server, &mut buffer[got..]).unwrap();
        }
        assert_eq!(&buffer[..5], b"hello");
        shutdown_write(&client).unwrap();
        assert_eq!(read(&server, &mut buffer).unwrap(), 0);
        client.set_nonblocking(true).unwrap();
        // The other direction is still open, and empty.
        let err = read(&client, &mut buffer).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::WouldBlock);
        // A file is not a socket.
        let file = std::fs::File::open("/proc/self/stat").unwrap();
        let err = shutdown_write(&file).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::ENOTSOCK));
    }

    #[test]
    fn a_file_is_not_a_namespace() {
        let file = std::fs::File::open("/proc/self/stat").unwrap();
        assert!(enter_network_namespace(&file).is_err());
    }
}
