package sandbox

import (
	"fmt"
	"os"
	"path/filepath"

	"github.com/containerd/containerd/v2/core/events/exchange"
	"github.com/containerd/containerd/v2/plugins"
	"github.com/containerd/log"
	"github.com/containerd/plugin"
	"github.com/containerd/plugin/registry"

	"github.com/kuasar-io/containerd-kuasar/plugins/metrics"
	"github.com/kuasar-io/containerd-kuasar/plugins/monitor"
)

// Env is what a kind gets at initialisation.
type Env struct {
	// Root and State are the controller plugin's own directories.
	Root  string
	State string
	// Monitor starts processes through the node's process keeper.
	Monitor *monitor.Monitor
	// Metrics is the controller's metrics, exported on containerd's
	// metrics endpoint: a kind adds its own gauges to it (Add, Desc) and
	// records what only it sees (VMBooted). Nil-safe.
	Metrics *metrics.Controller
}

// NewKind builds a kind from its plugin config. It may return an error
// wrapping plugin.ErrSkipPlugin when the host cannot run the kind.
type NewKind func(ic *plugin.InitContext, env Env) (Kind, error)

// Register registers a kind as the sandbox controller plugin id, with
// config as its default configuration. requires lists plugins the kind
// uses besides the framework's own (events, the process monitor).
func Register(id string, config any, newKind NewKind, requires ...plugin.Type) {
	registry.Register(&plugin.Registration{
		Type:     plugins.SandboxControllerPlugin,
		ID:       id,
		Config:   config,
		Requires: append([]plugin.Type{plugins.EventPlugin, monitor.Type}, requires...),
		InitFn: func(ic *plugin.InitContext) (any, error) {
			ep, err := ic.GetByID(plugins.EventPlugin, "exchange")
			if err != nil {
				return nil, err
			}
			mi, err := ic.GetByID(monitor.Type, monitor.ID)
			if err != nil {
				return nil, err
			}
			root := ic.Properties[plugins.PropertyRootDir]
			state := ic.Properties[plugins.PropertyStateDir]
			for _, d := range []string{root, state} {
				if err := os.MkdirAll(d, 0o700); err != nil {
					return nil, err
				}
			}
			m := metrics.NewController(id)
			kind, err := newKind(ic, Env{Root: root, State: state, Monitor: mi.(*monitor.Monitor), Metrics: m})
			if err != nil {
				return nil, err
			}
			paths := Paths{
				State:   filepath.Join(state, "sandboxes"),
				Sockets: filepath.Join(filepath.Dir(state), "k"),
			}
			c := NewController(id, kind, paths, ep.(*exchange.Exchange), WithMetrics(m))
			if err := c.Recover(ic.Context); err != nil {
				return nil, fmt.Errorf("recovering %s sandboxes: %w", id, err)
			}
			if err := metrics.Register(m.Collector()); err != nil {
				log.G(ic.Context).WithError(err).WithField("sandboxer", id).Error("the controller's metrics are not exported")
			}
			return c, nil
		},
	})
}
