package agent

import (
	"context"
	"fmt"
	"net"
	"strconv"

	"github.com/containerd/errdefs"
	"github.com/containerd/errdefs/pkg/errgrpc"
	"github.com/containerd/log"

	"github.com/kuasar-io/containerd-kuasar/plugins/vmm/agentapi"
)

// PortForward connects to the guest's localhost at the port the host's
// first frame names and relays (see agent.proto). ttrpc has no interceptor
// for streams: the error's class and a panic are handled here.
func (a *agent) PortForward(ctx context.Context, s agentapi.Agent_PortForwardServer) (err error) {
	defer func() {
		if r := recover(); r != nil {
			err = fmt.Errorf("port-forward panicked: %v: %w", r, errdefs.ErrInternal)
		}
		err = errgrpc.ToGRPC(err)
	}()
	return portForward(ctx, s)
}

func portForward(ctx context.Context, s agentapi.Agent_PortForwardServer) error {
	first, err := s.Recv()
	if err != nil {
		return err
	}
	port := first.GetPort()
	if port == 0 || port > 65535 {
		return fmt.Errorf("port %d: %w", port, errdefs.ErrInvalidArgument)
	}
	// As CRI does on a node: IPv4 first, then IPv6, one after the other.
	var d net.Dialer
	conn, err := d.DialContext(ctx, "tcp4", net.JoinHostPort("127.0.0.1", strconv.Itoa(int(port))))
	if err != nil {
		var err6 error
		conn, err6 = d.DialContext(ctx, "tcp6", net.JoinHostPort("::1", strconv.Itoa(int(port))))
		if err6 != nil {
			return fmt.Errorf("connecting to localhost:%d in the pod's VM: IPv4: %v, IPv6: %v: %w", port, err, err6, errdefs.ErrUnavailable)
		}
	}
	defer conn.Close()
	if len(first.GetData()) > 0 {
		if _, err := conn.Write(first.GetData()); err != nil {
			return err
		}
	}
	err = agentapi.Relay(ctx, conn, s, false)
	log.G(ctx).WithError(err).WithField("port", port).Debug("port forward ended")
	return err
}
