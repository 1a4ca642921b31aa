package wasmhost

import (
	"context"
	"fmt"
	"os"
	"time"

	"github.com/containerd/errdefs"
	"github.com/containerd/log"
	"google.golang.org/protobuf/types/known/emptypb"

	"github.com/kuasar-io/containerd-kuasar/plugins/internal/unixsock"
	"github.com/kuasar-io/containerd-kuasar/plugins/wasmhost/api"
)

// Listen serves the host's socket, one host per socket (a lock file guards
// it); closing the listener removes the socket.
func Listen(socket string) (*unixsock.Listener, error) {
	return unixsock.Listen("unix", socket)
}

// Serve answers clients on l (ttrpc, same user only) until ctx is done or
// the host has been idle (no containers) for its idle time. Clients see
// the host go as soon as it stops serving: their connections are closed.
func (h *Host) Serve(ctx context.Context, l *unixsock.Listener) error {
	srv, err := unixsock.NewServer("wasm host")
	if err != nil {
		return err
	}
	api.RegisterWasmHostService(srv, &service{h: h})
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
	// The listener's lock stays held until the caller closes l, once
	// every module is gone: no second host serves meanwhile.
	return unixsock.Serve(ctx, srv, l.UnixListener)
}

// service is the host's ttrpc API. Each call's context carries the
// client's deadline; errors keep their errdefs class (unixsock.NewServer).
type service struct {
	h *Host
}

var _ api.WasmHostService = (*service)(nil)

func (s *service) Hello(_ context.Context, r *api.HelloRequest) (*api.HelloResponse, error) {
	if r.GetVersion() != ProtocolVersion {
		return nil, fmt.Errorf("wasm host speaks protocol %d, the client %d: %w", ProtocolVersion, r.GetVersion(), errdefs.ErrFailedPrecondition)
	}
	return &api.HelloResponse{Version: ProtocolVersion, Pid: int32(os.Getpid()), Boot: s.h.boot}, nil
}

func (s *service) Create(ctx context.Context, r *api.CreateRequest) (*api.ProcessState, error) {
	st, err := s.h.Create(ctx, r)
	if err != nil {
		log.G(ctx).WithError(err).WithField("container", r.GetId()).Info("wasm container not created")
	}
	return st, err
}

func (s *service) Exec(ctx context.Context, r *api.ExecRequest) (*api.ProcessState, error) {
	return s.h.Exec(ctx, r)
}

func (s *service) Start(_ context.Context, r *api.ProcessRef) (*api.ProcessState, error) {
	return s.h.Start(r)
}

func (s *service) Wait(ctx context.Context, r *api.ProcessRef) (*api.Exit, error) {
	return s.h.Wait(ctx, r)
}

func (s *service) State(_ context.Context, r *api.ProcessRef) (*api.ProcessState, error) {
	return s.h.State(r)
}

func (s *service) Kill(_ context.Context, r *api.KillRequest) (*emptypb.Empty, error) {
	return &emptypb.Empty{}, s.h.Kill(r)
}

func (s *service) Delete(_ context.Context, r *api.ProcessRef) (*api.ProcessState, error) {
	return s.h.Delete(r)
}

func (s *service) CloseStdin(_ context.Context, r *api.ProcessRef) (*emptypb.Empty, error) {
	return &emptypb.Empty{}, s.h.CloseStdin(r)
}

func (s *service) Update(_ context.Context, r *api.UpdateRequest) (*emptypb.Empty, error) {
	return &emptypb.Empty{}, s.h.Update(r)
}

func (s *service) Stats(_ context.Context, r *api.ProcessRef) (*api.ContainerStats, error) {
	return s.h.Stats(r)
}

func (s *service) List(_ context.Context, r *api.PodRef) (*api.ListResponse, error) {
	return &api.ListResponse{Processes: s.h.List(r.GetPod())}, nil
}

func (s *service) ReleasePod(_ context.Context, r *api.PodRef) (*emptypb.Empty, error) {
	return &emptypb.Empty{}, s.h.ReleasePod(r.GetPod())
}

func (s *service) HostStats(context.Context, *emptypb.Empty) (*api.HostStatsResponse, error) {
	return s.h.HostStats(), nil
}
