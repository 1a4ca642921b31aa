package agentapi

import (
	"context"
	"io"
	"net"
	"testing"
	"time"
)

// pipeStream is one end of an in-memory frame stream.
type pipeStream struct {
	in  <-chan *PortForwardFrame
	out chan<- *PortForwardFrame
}

func (p pipeStream) Send(f *PortForwardFrame) error { p.out <- f; return nil }
func (p pipeStream) Recv() (*PortForwardFrame, error) {
	f, ok := <-p.in
	if !ok {
		return nil, io.EOF
	}
	return f, nil
}

func streams() (a, b pipeStream) {
	ab, ba := make(chan *PortForwardFrame, 64), make(chan *PortForwardFrame, 64)
	return pipeStream{in: ba, out: ab}, pipeStream{in: ab, out: ba}
}

// TestRelay: bytes both ways through two relays joined by a frame stream
// (a client and a TCP server, as the host and the agent are), the server's
// half-close reaching the client, and the client's end ending the relay
// that ends at the peer's eof.
func TestRelay(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go func() {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		defer c.Close()
		buf := make([]byte, 5)
		if _, err := io.ReadFull(c, buf); err != nil {
			return
		}
		c.Write(append([]byte("echo:"), buf...))
	}()
	srv, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer srv.Close()
	host, agent := streams()
	client, cri := net.Pipe()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	agentDone := make(chan error, 1)
	go func() { agentDone <- Relay(ctx, srv, agent, false) }()
	hostDone := make(chan error, 1)
	go func() { hostDone <- Relay(ctx, cri, host, true) }()

	if _, err := client.Write([]byte("hello")); err != nil {
		t.Fatal(err)
	}
	got := make([]byte, 10)
	if _, err := io.ReadFull(client, got); err != nil || string(got) != "echo:hello" {
		t.Fatalf("read %q, %v", got, err)
	}
	// The server closed: its eof ends the host's relay.
	if err := <-hostDone; err != nil {
		t.Fatalf("host relay: %v", err)
	}
	cri.Close()
	client.Close()
	close(host.out)
	if err := <-agentDone; err != nil {
		t.Fatalf("agent relay: %v", err)
	}
}
