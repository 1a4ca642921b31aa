package wasmhost

import (
	"context"
	"fmt"
	"net"
	"net/rpc"
	"net/rpc/jsonrpc"
	"os"
	"runtime/debug"
	"sync"
	"time"

	"github.com/containerd/log"

	"github.com/kuasar-io/containerd-kuasar/plugins/internal/unixsock"
)

// Listen serves the host's socket, one host per socket (a lock file guards
// it); closing the listener removes the socket.
func Listen(socket string) (*unixsock.Listener, error) {
	return unixsock.Listen("unix", socket)
}

// Serve answers clients on l until ctx is done or the host has been idle
// (no containers) for its idle time.
func (h *Host) Serve(ctx context.Context, l *net.UnixListener) error {
	srv := rpc.NewServer()
	if err := srv.RegisterName(serviceName, &service{h: h, ctx: ctx}); err != nil {
		return err
	}
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	go h.collectSockets(ctx)
	if h.idle > 0 {
		go func() {
			t := time.NewTicker(h.idle/4 + time.Millisecond)
			defer t.Stop()
			for {
				select {
				case <-ctx.Done():
					return
				case <-t.C:
				}
				if h.beginIdleExit(h.idle) {
					log.G(ctx).Info("wasm host idle: no containers; exiting")
					cancel()
					return
				}
			}
		}()
	}
	// Clients see the host go as soon as it stops serving.
	var connsMu sync.Mutex
	conns := map[*net.UnixConn]struct{}{}
	defer func() {
		connsMu.Lock()
		defer connsMu.Unlock()
		for c := range conns {
			c.Close()
		}
	}()
	unixsock.Accept(ctx, l, "wasm host", func(c *net.UnixConn) {
		connsMu.Lock()
		conns[c] = struct{}{}
		connsMu.Unlock()
		go func() {
			srv.ServeCodec(jsonrpc.NewServerCodec(c))
			connsMu.Lock()
			delete(conns, c)
			connsMu.Unlock()
		}()
	})
	return nil
}

// service exposes a Host over net/rpc. Its methods follow net/rpc's shape;
// errors keep their containerd class across the wire.
type service struct {
	h   *Host
	ctx context.Context
}

// guard turns a panic in a call into its error: a bug met by one call
// must not end the host, and every Wasm container with it.
func guard(err *error) {
	if r := recover(); r != nil {
		log.L.WithField("panic", r).WithField("stack", string(debug.Stack())).Error("wasm host call panicked")
		*err = fmt.Errorf("wasm host internal error: %v", r)
	}
}

func (s *service) Hello(_ *Empty, r *HelloReply) error {
	*r = HelloReply{Version: ProtocolVersion, Pid: os.Getpid(), Boot: s.h.boot}
	return nil
}

func (s *service) Create(req *CreateRequest, r *State) (err error) {
	defer guard(&err)
	*r, err = s.h.Create(s.ctx, req)
	if err != nil {
		log.G(s.ctx).WithError(err).WithField("container", req.ID).Info("wasm container not created")
	}
	return encodeError(err)
}

func (s *service) Exec(req *ExecRequest, r *State) (err error) {
	defer guard(&err)
	*r, err = s.h.Exec(s.ctx, req)
	return encodeError(err)
}

func (s *service) Start(req *Ref, r *State) (err error) {
	defer guard(&err)
	*r, err = s.h.Start(*req)
	return encodeError(err)
}

func (s *service) Wait(req *Ref, r *Exit) (err error) {
	defer guard(&err)
	*r, err = s.h.Wait(s.ctx, *req)
	return encodeError(err)
}

func (s *service) State(req *Ref, r *State) (err error) {
	defer guard(&err)
	*r, err = s.h.State(*req)
	return encodeError(err)
}

func (s *service) Kill(req *KillRequest, _ *Empty) (err error) {
	defer guard(&err)
	return encodeError(s.h.Kill(*req))
}

func (s *service) Delete(req *Ref, r *State) (err error) {
	defer guard(&err)
	*r, err = s.h.Delete(*req)
	return encodeError(err)
}

func (s *service) CloseStdin(req *Ref, _ *Empty) (err error) {
	defer guard(&err)
	return encodeError(s.h.CloseStdin(*req))
}

func (s *service) Update(req *UpdateRequest, _ *Empty) (err error) {
	defer guard(&err)
	return encodeError(s.h.Update(*req))
}

func (s *service) Stats(req *Ref, r *Stats) (err error) {
	defer guard(&err)
	*r, err = s.h.Stats(*req)
	return encodeError(err)
}

func (s *service) List(req *PodRequest, r *[]State) (err error) {
	defer guard(&err)
	*r = s.h.List(req.Pod)
	return nil
}

func (s *service) ReleasePod(req *PodRequest, _ *Empty) (err error) {
	defer guard(&err)
	return encodeError(s.h.ReleasePod(req.Pod))
}

func (s *service) HostStats(_ *Empty, r *HostStats) (err error) {
	defer guard(&err)
	*r = s.h.HostStats()
	return nil
}
