package agentapi

import (
	"context"
	"errors"
	"io"
)

// FrameStream is either end of a PortForward stream.
type FrameStream interface {
	Send(*PortForwardFrame) error
	Recv() (*PortForwardFrame, error)
}

// errPeerDone ends a relay when the peer's eof ends it, or the peer ended
// the stream.
var errPeerDone = errors.New("the peer sent eof")

// Relay copies conn to s as data frames (eof at conn's end) and s's data
// to conn, until both directions are done, either fails, or ctx ends. At
// the peer's eof, conn's write side is closed when it can be (a TCP
// connection's); with peerEOFEnds the relay ends there instead, as CRI's
// port-forward ends when one direction does. The peer's end of the stream
// ends it too. The caller closes conn
// afterwards, which ends a read still blocked on it.
func Relay(ctx context.Context, conn io.ReadWriter, s FrameStream, peerEOFEnds bool) error {
	errc := make(chan error, 2)
	go func() {
		buf := make([]byte, 32<<10)
		for {
			n, err := conn.Read(buf)
			if n > 0 {
				if serr := s.Send(&PortForwardFrame{Data: append([]byte(nil), buf[:n]...)}); serr != nil {
					errc <- serr
					return
				}
			}
			if errors.Is(err, io.EOF) {
				errc <- s.Send(&PortForwardFrame{Eof: true})
				return
			}
			if err != nil {
				errc <- err
				return
			}
		}
	}()
	go func() {
		for {
			f, err := s.Recv()
			if errors.Is(err, io.EOF) {
				// The peer ended the stream: nothing more either way.
				errc <- errPeerDone
				return
			}
			if err != nil {
				errc <- err
				return
			}
			if len(f.GetData()) > 0 {
				if _, err := conn.Write(f.GetData()); err != nil {
					errc <- err
					return
				}
			}
			if f.GetEof() {
				if peerEOFEnds {
					errc <- errPeerDone
					return
				}
				if cw, ok := conn.(interface{ CloseWrite() error }); ok {
					_ = cw.CloseWrite()
				}
				errc <- nil
				return
			}
		}
	}()
	for range 2 {
		select {
		case err := <-errc:
			if errors.Is(err, errPeerDone) {
				return nil
			}
			if err != nil {
				return err
			}
		case <-ctx.Done():
			return ctx.Err()
		}
	}
	return nil
}
