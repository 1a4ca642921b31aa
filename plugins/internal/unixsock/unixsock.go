// Package unixsock is how the node-wide helpers of containerd-kuasar (the
// process keeper, the Wasm host) serve their Unix sockets: one server per
// socket, guarded by a lock file that outlives a stale socket, and only
// clients of the server's own user admitted.
package unixsock

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"syscall"
	"time"

	"github.com/containerd/errdefs"
	"github.com/containerd/log"
	"golang.org/x/sys/unix"
)

// Listen takes the lock of socket and listens on it (network "unix" or
// "unixpacket"), replacing a stale socket file. Close releases both.
func Listen(network, socket string) (*Listener, error) {
	if err := os.MkdirAll(filepath.Dir(socket), 0o700); err != nil {
		return nil, err
	}
	lock, err := os.OpenFile(socket+".lock", os.O_CREATE|os.O_RDWR, 0o600)
	if err != nil {
		return nil, err
	}
	if err := unix.Flock(int(lock.Fd()), unix.LOCK_EX|unix.LOCK_NB); err != nil {
		lock.Close()
		return nil, fmt.Errorf("another server holds %s: %w", lock.Name(), err)
	}
	_ = os.Remove(socket)
	l, err := net.ListenUnix(network, &net.UnixAddr{Name: socket, Net: network})
	if err != nil {
		lock.Close()
		return nil, err
	}
	if err := os.Chmod(socket, 0o600); err != nil {
		l.Close()
		lock.Close()
		return nil, err
	}
	return &Listener{UnixListener: l, socket: socket, lock: lock}, nil
}

// Listener is a socket served under its lock.
type Listener struct {
	*net.UnixListener
	socket string
	lock   *os.File
}

// Close stops listening, removes the socket and releases the lock.
func (l *Listener) Close() error {
	err := l.UnixListener.Close()
	os.Remove(l.socket)
	l.lock.Close()
	return err
}

// peerCred is who is at the other end of c (for a client: who listened).
func peerCred(c net.Conn) (*unix.Ucred, error) {
	sc, ok := c.(syscall.Conn)
	if !ok {
		return nil, fmt.Errorf("%T is not a socket", c)
	}
	raw, err := sc.SyscallConn()
	if err != nil {
		return nil, err
	}
	var cred *unix.Ucred
	var cerr error
	if err := raw.Control(func(fd uintptr) {
		cred, cerr = unix.GetsockoptUcred(int(fd), unix.SOL_SOCKET, unix.SO_PEERCRED)
	}); err != nil {
		return nil, err
	}
	return cred, cerr
}

// PeerPid is the pid of the process at the other end of c (for a client:
// the one that listened), in the caller's PID namespace (0 if it is not
// in it).
func PeerPid(c net.Conn) (int, error) {
	cred, err := peerCred(c)
	if err != nil {
		return 0, err
	}
	return int(cred.Pid), nil
}

// CheckPeerPid admits only a peer that is process pid: a client's check
// of who serves a socket in a directory someone else can write.
func CheckPeerPid(c net.Conn, pid int) error {
	cred, err := peerCred(c)
	if err != nil {
		return err
	}
	if int(cred.Pid) != pid {
		return fmt.Errorf("served by pid %d, not by %d: %w", cred.Pid, pid, errdefs.ErrPermissionDenied)
	}
	return nil
}

// CheckPeer admits only clients of the calling process's own user.
func CheckPeer(c *net.UnixConn) error {
	cred, err := peerCred(c)
	if err != nil {
		return err
	}
	if int(cred.Uid) != os.Geteuid() {
		return fmt.Errorf("peer uid %d is not %d", cred.Uid, os.Geteuid())
	}
	return nil
}

// Accept takes clients on l until ctx is done (then closes l), admits only
// the server's own user (CheckPeer), and hands each client to serve. name
// names the server in its logs.
func Accept(ctx context.Context, l *net.UnixListener, name string, serve func(*net.UnixConn)) {
	go func() {
		<-ctx.Done()
		l.Close()
	}()
	for {
		c, err := l.AcceptUnix()
		if err != nil {
			if ctx.Err() != nil || errors.Is(err, net.ErrClosed) {
				return
			}
			log.G(ctx).WithError(err).Warn(name + " accept")
			time.Sleep(50 * time.Millisecond)
			continue
		}
		if err := CheckPeer(c); err != nil {
			log.G(ctx).WithError(err).Warn(name + " refused a client")
			c.Close()
			continue
		}
		serve(c)
	}
}
