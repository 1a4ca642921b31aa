package channel

import (
	"io"
	"net"
	"os"
	"sync"
	"time"
)

// link is a fake virtio-serial link between a guest port and the host's
// connections to QEMU's chardev socket, with the semantics measured on
// QEMU 7.2: bytes the host writes before the guest opened its port are
// lost; the guest's reads return io.EOF while no host is connected; the
// guest's writes block until a host is connected; bytes already queued
// towards the guest survive a host reconnect.
type link struct {
	mu        sync.Mutex
	cond      *sync.Cond
	toGuest   []byte
	host      *hostEnd
	guestOpen bool
	port      *fakePort
	// dropGuestWrites makes guest writes while no host is connected
	// disappear instead of blocking.
	dropGuestWrites bool
}

func newLink() *link {
	l := &link{}
	l.cond = sync.NewCond(&l.mu)
	return l
}

// open opens the guest's port (a new one each time: a rebooted guest).
func (l *link) open() *fakePort {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.guestOpen = true
	l.toGuest = nil
	l.port = &fakePort{l: l}
	return l.port
}

// connect connects a new host, replacing (closing) the current one,
// possibly before the guest sees the host side closed (as when QEMU
// accepts the next client before the guest polls).
func (l *link) connect() *hostEnd {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.host != nil {
		l.host.closed = true
	}
	h := &hostEnd{l: l}
	l.host = h
	l.cond.Broadcast()
	return h
}

type fakePort struct {
	l        *link
	closed   bool
	deadline time.Time
	// inject, if set, is written raw before the next write.
	inject []byte
}

func (p *fakePort) Read(b []byte) (int, error) {
	l := p.l
	l.mu.Lock()
	defer l.mu.Unlock()
	for {
		if p.closed || l.port != p {
			return 0, net.ErrClosed
		}
		if len(l.toGuest) > 0 {
			n := copy(b, l.toGuest)
			l.toGuest = l.toGuest[n:]
			return n, nil
		}
		if l.host == nil || l.host.closed {
			return 0, io.EOF
		}
		l.cond.Wait()
	}
}

func (p *fakePort) Write(b []byte) (int, error) {
	l := p.l
	l.mu.Lock()
	defer l.mu.Unlock()
	for {
		if p.closed || l.port != p {
			return 0, net.ErrClosed
		}
		if l.host != nil && !l.host.closed {
			break
		}
		if l.dropGuestWrites {
			return len(b), nil
		}
		if !p.deadline.IsZero() && !time.Now().Before(p.deadline) {
			return 0, os.ErrDeadlineExceeded
		}
		l.cond.Wait()
	}
	h := l.host
	h.in = append(h.in, p.inject...)
	p.inject = nil
	h.in = append(h.in, b...)
	l.cond.Broadcast()
	return len(b), nil
}

// SetWriteDeadline bounds a write blocked while no host is connected, as
// an os.File on a pollable device does.
func (p *fakePort) SetWriteDeadline(t time.Time) error {
	p.l.mu.Lock()
	defer p.l.mu.Unlock()
	p.deadline = t
	if !t.IsZero() {
		time.AfterFunc(time.Until(t), func() {
			p.l.mu.Lock()
			p.l.cond.Broadcast()
			p.l.mu.Unlock()
		})
	}
	return nil
}

func (p *fakePort) Close() error {
	p.l.mu.Lock()
	defer p.l.mu.Unlock()
	p.closed = true
	if p.l.port == p {
		p.l.guestOpen = false
	}
	p.l.cond.Broadcast()
	return nil
}

// hostEnd is one host connection.
type hostEnd struct {
	l      *link
	closed bool   // guarded by l.mu
	in     []byte // guest -> this host
}

func (h *hostEnd) Read(b []byte) (int, error) {
	l := h.l
	l.mu.Lock()
	defer l.mu.Unlock()
	for {
		if len(h.in) > 0 {
			n := copy(b, h.in)
			h.in = h.in[n:]
			return n, nil
		}
		if h.closed {
			return 0, net.ErrClosed
		}
		l.cond.Wait()
	}
}

func (h *hostEnd) Write(b []byte) (int, error) {
	l := h.l
	l.mu.Lock()
	defer l.mu.Unlock()
	if h.closed {
		return 0, net.ErrClosed
	}
	if l.guestOpen {
		l.toGuest = append(l.toGuest, b...)
		l.cond.Broadcast()
	}
	return len(b), nil
}

func (h *hostEnd) Close() error {
	h.l.mu.Lock()
	defer h.l.mu.Unlock()
	h.closed = true
	h.l.cond.Broadcast()
	return nil
}
