package unixsock

import (
	"context"
	"errors"
	"fmt"
	"net"
	"runtime/debug"

	"github.com/containerd/errdefs"
	"github.com/containerd/errdefs/pkg/errgrpc"
	"github.com/containerd/log"
	"github.com/containerd/ttrpc"
	"google.golang.org/grpc/status"
)

// NewServer returns the ttrpc server every helper of containerd-kuasar
// serves its API with: only clients of the server's own user are admitted,
// errors cross the wire with their errdefs class (errgrpc codes), and a
// panic in a call is that call's error, not the end of the server.
func NewServer(name string) (*ttrpc.Server, error) {
	return ttrpc.NewServer(
		ttrpc.WithServerHandshaker(ttrpc.UnixSocketRequireSameUser()),
		ttrpc.WithUnaryServerInterceptor(func(ctx context.Context, unmarshal ttrpc.Unmarshaler, info *ttrpc.UnaryServerInfo, method ttrpc.Method) (resp any, err error) {
			defer func() {
				if r := recover(); r != nil {
					log.G(ctx).WithField("panic", r).WithField("method", info.FullMethod).
						WithField("stack", string(debug.Stack())).Error(name + " call panicked")
					resp, err = nil, errgrpc.ToGRPC(fmt.Errorf("%s internal error in %s: %v: %w", name, info.FullMethod, r, errdefs.ErrInternal))
				}
			}()
			resp, err = method(ctx, unmarshal)
			return resp, errgrpc.ToGRPC(err)
		}),
	)
}

// Serve serves srv on l until ctx is done, then closes srv and l.
func Serve(ctx context.Context, srv *ttrpc.Server, l net.Listener) error {
	go func() {
		<-ctx.Done()
		srv.Close()
	}()
	err := srv.Serve(ctx, l)
	if errors.Is(err, ttrpc.ErrServerClosed) || ctx.Err() != nil {
		return nil
	}
	return err
}

// Dial connects a ttrpc client to a helper's socket; onClose runs once the
// connection is gone. Errors of calls carry grpc codes: Native turns them
// back into errdefs classes.
func Dial(ctx context.Context, socket string, onClose func()) (*ttrpc.Client, error) {
	var d net.Dialer
	c, err := d.DialContext(ctx, "unix", socket)
	if err != nil {
		return nil, err
	}
	var opts []ttrpc.ClientOpts
	if onClose != nil {
		opts = append(opts, ttrpc.WithOnClose(onClose))
	}
	return ttrpc.NewClient(c, opts...), nil
}

// Native returns the error of a ttrpc call with its errdefs class restored
// when the server returned it (a status). Errors of the client's own
// (ttrpc.ErrClosed, the call's context) are returned as they are, so that
// callers can tell a broken connection from an answer. (A client
// interceptor cannot do this: ttrpc.Client.Call turns the response's status
// into an error after its interceptor has returned.)
func Native(err error) error {
	if _, ok := status.FromError(err); ok && err != nil {
		return errgrpc.ToNative(err)
	}
	return err
}

// IsClosed reports whether err says the connection to the server is gone
// (the call may or may not have reached it).
func IsClosed(err error) bool {
	return errors.Is(err, ttrpc.ErrClosed) || errors.Is(err, net.ErrClosed) || errdefs.IsUnavailable(err)
}
