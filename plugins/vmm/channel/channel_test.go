package channel

import (
	"bytes"
	"context"
	"errors"
	"io"
	"net"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/containerd/ttrpc"
	"google.golang.org/protobuf/types/known/wrapperspb"
)

// fast options keep the tests quick; no test asserts on timing.
var fast = []Option{WithRetry(5*time.Millisecond, 50*time.Millisecond), WithPoll(time.Millisecond, 5*time.Millisecond), WithHello([]byte("hi"), 20*time.Millisecond)}

func testCtx(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	t.Cleanup(cancel)
	return ctx
}

// accept returns the guest's next session.
func accept(t *testing.T, l *Listener) net.Conn {
	t.Helper()
	type res struct {
		c   net.Conn
		err error
	}
	ch := make(chan res, 1)
	go func() { c, err := l.Accept(); ch <- res{c, err} }()
	select {
	case r := <-ch:
		if r.err != nil {
			t.Fatalf("accept: %v", r.err)
		}
		return r.c
	case <-time.After(20 * time.Second):
		t.Fatal("no session accepted")
	}
	return nil
}

// connected returns a link with a listening guest and a host session,
// closed at the end of the test.
func connected(t *testing.T) (*link, *Listener, *Conn) {
	t.Helper()
	lk := newLink()
	l := Listen(lk.open(), fast...)
	t.Cleanup(func() { l.Close() })
	host, err := Client(testCtx(t), lk.connect(), fast...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { host.Close() })
	return lk, l, host
}

// roundTrip checks that bytes cross both ways.
func roundTrip(t *testing.T, host, guest net.Conn, size int) {
	t.Helper()
	msg := bytes.Repeat([]byte("0123456789abcdef"), size/16+1)[:size]
	for _, dir := range []struct {
		name string
		w, r net.Conn
	}{{"host->guest", host, guest}, {"guest->host", guest, host}} {
		errc := make(chan error, 1)
		go func() { _, err := dir.w.Write(msg); errc <- err }()
		got := make([]byte, len(msg))
		if _, err := io.ReadFull(dir.r, got); err != nil {
			t.Fatalf("%s: read: %v", dir.name, err)
		}
		if err := <-errc; err != nil {
			t.Fatalf("%s: write: %v", dir.name, err)
		}
		if !bytes.Equal(got, msg) {
			t.Fatalf("%s: bytes differ", dir.name)
		}
	}
}

func TestSession(t *testing.T) {
	for _, size := range []int{1, MaxPayload - 1, MaxPayload, MaxPayload + 1, 3*MaxPayload + 7, 1 << 20} {
		lk := newLink()
		l := Listen(lk.open(), fast...)
		defer l.Close()
		host, err := Client(testCtx(t), lk.connect(), fast...)
		if err != nil {
			t.Fatal(err)
		}
		guest := accept(t, l)
		roundTrip(t, host, guest, size)
		if hello, at := host.Hello(); string(hello) != "hi" || at.IsZero() {
			t.Errorf("hello %q at %v", hello, at)
		}
		host.Close()
	}
}

func TestStreamNoise(t *testing.T) {
	valid := appendFrame(nil, typeData, 42, []byte("stale session"))
	tests := []struct {
		name    string
		toGuest []byte // written raw by the host before its client starts
		toHost  []byte // written raw by the guest before its next frame
	}{
		{"garbage", []byte("garbage\xb5\xb5K\x00 more"), []byte("\xb5Kjunk")},
		{"half frame", valid[:headerLen+3], valid[5:]},
		{"stale whole frame", valid, valid},
		{"header that promises a full payload", appendFrame(nil, typeData, 7, make([]byte, MaxPayload))[:headerLen+10],
			appendFrame(nil, typeData, 7, make([]byte, MaxPayload))[:headerLen+10]},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			lk := newLink()
			port := lk.open()
			port.inject = tc.toHost
			l := Listen(port, fast...)
			defer l.Close()
			he := lk.connect()
			he.Write(tc.toGuest)
			host, err := Client(testCtx(t), he, fast...)
			if err != nil {
				t.Fatal(err)
			}
			defer host.Close()
			roundTrip(t, host, accept(t, l), 100)
		})
	}
}

// TestHostReconnect closes the host side in the middle of a frame, as a
// daemon that dies does, and starts a new session.
func TestHostReconnect(t *testing.T) {
	for _, quiet := range []bool{false, true} {
		name := "guest sees the host close"
		if quiet {
			name = "next host connects before the guest notices"
		}
		t.Run(name, func(t *testing.T) {
			lk := newLink()
			l := Listen(lk.open(), fast...)
			defer l.Close()
			he := lk.connect()
			host, err := Client(testCtx(t), he, fast...)
			if err != nil {
				t.Fatal(err)
			}
			guest := accept(t, l)
			roundTrip(t, host, guest, 10)

			// Half a data frame of a big payload, then the host is gone.
			half := appendFrame(nil, typeData, host.Session(), bytes.Repeat([]byte{'x'}, MaxPayload))[:MaxPayload/2]
			he.Write(half)
			if !quiet {
				he.Close()
				// The guest session ends once the guest sees the host gone.
				if _, err := io.ReadAll(guest); err != nil && !errors.Is(err, ErrSuperseded) {
					t.Fatalf("old guest session: %v", err)
				}
			}
			host2, err := Client(testCtx(t), lk.connect(), fast...)
			if err != nil {
				t.Fatal(err)
			}
			defer host2.Close()
			if host2.Session() == host.Session() {
				t.Fatal("same session twice")
			}
			guest2 := accept(t, l)
			roundTrip(t, host2, guest2, 3*MaxPayload)
			if _, err := guest.Read(make([]byte, 1)); err == nil {
				t.Error("the old guest session still reads")
			}
		})
	}
}

// TestGuestNotOpenYet: resets sent before the guest opens its port are
// lost; the host keeps resending.
func TestGuestNotOpenYet(t *testing.T) {
	lk := newLink()
	he := lk.connect()
	type res struct {
		c   *Conn
		err error
	}
	ch := make(chan res, 1)
	go func() { c, err := Client(testCtx(t), he, fast...); ch <- res{c, err} }()
	time.Sleep(30 * time.Millisecond) // let a few resets go to nowhere
	l := Listen(lk.open(), fast...)
	defer l.Close()
	r := <-ch
	if r.err != nil {
		t.Fatal(r.err)
	}
	defer r.c.Close()
	roundTrip(t, r.c, accept(t, l), 10)
}

// TestGuestRestart: a guest that starts over (agent or VM restart) says
// hello again; the host's session ends with ErrPeerRestarted.
func TestGuestRestart(t *testing.T) {
	lk := newLink()
	l := Listen(lk.open(), fast...)
	host, err := Client(testCtx(t), lk.connect(), fast...)
	if err != nil {
		t.Fatal(err)
	}
	roundTrip(t, host, accept(t, l), 10)
	l.Close()
	l2 := Listen(lk.open(), fast...)
	defer l2.Close()
	if _, err := io.ReadAll(host); !errors.Is(err, ErrPeerRestarted) {
		t.Fatalf("host read after guest restart: %v", err)
	}
	host2, err := Client(testCtx(t), lk.connect(), fast...)
	if err != nil {
		t.Fatal(err)
	}
	defer host2.Close()
	roundTrip(t, host2, accept(t, l2), 10)
}

func TestClose(t *testing.T) {
	tests := []struct {
		name  string
		close func(host, guest net.Conn)
		read  func(host, guest net.Conn) net.Conn
	}{
		{"host closes", func(h, g net.Conn) { h.Close() }, func(h, g net.Conn) net.Conn { return g }},
		{"guest closes", func(h, g net.Conn) { g.Close() }, func(h, g net.Conn) net.Conn { return h }},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			_, l, host := connected(t)
			guest := accept(t, l)
			tc.close(host, guest)
			peer := tc.read(host, guest)
			if _, err := peer.Read(make([]byte, 1)); err != io.EOF {
				t.Errorf("peer read after close: %v, want EOF", err)
			}
			if _, err := peer.Write([]byte("x")); err == nil {
				t.Error("peer write after close succeeded")
			}
		})
	}
}

func TestNoAnswer(t *testing.T) {
	lk := newLink()
	ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
	defer cancel()
	_, err := Client(ctx, lk.connect(), fast...)
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("err %v", err)
	}
}

func TestReadDeadline(t *testing.T) {
	_, l, host := connected(t)
	host.SetReadDeadline(time.Now().Add(20 * time.Millisecond))
	if _, err := host.Read(make([]byte, 1)); !errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("read: %v", err)
	}
	host.SetReadDeadline(time.Time{})
	roundTrip(t, host, accept(t, l), 10)
}

// TestTTRPC runs ttrpc over sessions across a reconnect, over a real Unix
// socket on the host side.
func TestTTRPC(t *testing.T) {
	lk := newLink()
	l := Listen(lk.open(), fast...)
	defer l.Close()
	srv, err := ttrpc.NewServer()
	if err != nil {
		t.Fatal(err)
	}
	srv.RegisterService("test.Echo", &ttrpc.ServiceDesc{Methods: map[string]ttrpc.Method{
		"Echo": func(ctx context.Context, unmarshal func(any) error) (any, error) {
			var req wrapperspb.BytesValue
			if err := unmarshal(&req); err != nil {
				return nil, err
			}
			return &req, nil
		},
	}})
	go srv.Serve(context.Background(), l)
	defer srv.Close()

	// The host reaches the guest's end through a Unix socket (as QEMU's
	// chardev), bridged to the fake link.
	sock := filepath.Join(t.TempDir(), "agent.sock")
	ul, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	defer ul.Close()
	go func() {
		for {
			c, err := ul.Accept()
			if err != nil {
				return
			}
			he := lk.connect()
			go func() { io.Copy(he, c); he.Close() }()
			go func() { io.Copy(c, he); c.Close() }()
		}
	}()
	for i := range 3 {
		conn, err := DialUnix(testCtx(t), sock, fast...)
		if err != nil {
			t.Fatal(err)
		}
		client := ttrpc.NewClient(conn)
		for _, size := range []int{0, 100, 200 << 10} {
			req := &wrapperspb.BytesValue{Value: bytes.Repeat([]byte{byte(i)}, size)}
			var resp wrapperspb.BytesValue
			if err := client.Call(testCtx(t), "test.Echo", "Echo", req, &resp); err != nil {
				t.Fatalf("session %d, %d bytes: %v", i, size, err)
			}
			if !bytes.Equal(resp.Value, req.Value) {
				t.Fatalf("session %d: echo differs", i)
			}
		}
		client.Close()
	}
}

// TestHelloRace: a guest that is about to say hello when a session
// starts must not say it after acknowledging the session (the host would
// take it for a restart).
func TestHelloRace(t *testing.T) {
	lk := newLink()
	opts := []Option{WithRetry(time.Millisecond, 5*time.Millisecond), WithPoll(time.Millisecond, 2*time.Millisecond), WithHello([]byte("hi"), time.Millisecond)}
	l := Listen(lk.open(), opts...)
	defer l.Close()
	// Once a hello is decided, give a session that starts meanwhile the
	// time to be acknowledged before the hello goes.
	l.mu.Lock()
	l.afterIdle = func() {
		for deadline := time.Now().Add(20 * time.Millisecond); time.Now().Before(deadline); time.Sleep(time.Millisecond) {
			l.mu.Lock()
			started := l.cur != nil
			l.mu.Unlock()
			if started {
				time.Sleep(5 * time.Millisecond)
				return
			}
		}
	}
	l.mu.Unlock()
	for range 20 {
		host, err := Client(testCtx(t), lk.connect(), opts...)
		if err != nil {
			t.Fatal(err)
		}
		guest := accept(t, l)
		time.Sleep(5 * time.Millisecond)
		roundTrip(t, host, guest, 10)
		host.Close()
	}
}
