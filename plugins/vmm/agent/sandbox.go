package agent

import (
	"context"
	"fmt"

	"github.com/containerd/errdefs"
	"google.golang.org/protobuf/types/known/emptypb"

	"github.com/kuasar-io/containerd-kuasar/plugins/vmm/agentapi"
)

// Not yet: the pod and its containers' streams.

func (a *agent) SetupSandbox(ctx context.Context, r *agentapi.SetupSandboxRequest) (*agentapi.SetupSandboxResponse, error) {
	return nil, fmt.Errorf("SetupSandbox: %w", errdefs.ErrNotImplemented)
}

func (a *agent) ReadStdio(ctx context.Context, r *agentapi.ReadStdioRequest) (*agentapi.ReadStdioResponse, error) {
	return nil, fmt.Errorf("ReadStdio: %w", errdefs.ErrNotImplemented)
}

func (a *agent) WriteStdin(ctx context.Context, r *agentapi.WriteStdinRequest) (*emptypb.Empty, error) {
	return nil, fmt.Errorf("WriteStdin: %w", errdefs.ErrNotImplemented)
}

func (a *agent) CloseStdin(ctx context.Context, r *agentapi.ProcessStdio) (*emptypb.Empty, error) {
	return nil, fmt.Errorf("CloseStdin: %w", errdefs.ErrNotImplemented)
}

func (a *agent) PodStats(ctx context.Context, _ *emptypb.Empty) (*agentapi.PodStatsResponse, error) {
	return nil, fmt.Errorf("PodStats: %w", errdefs.ErrNotImplemented)
}
