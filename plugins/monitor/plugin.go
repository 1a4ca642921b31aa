package monitor

import (
	"fmt"
	"os"
	"path/filepath"

	"github.com/containerd/containerd/v2/plugins"
	"github.com/containerd/log"
	"github.com/containerd/plugin"
	"github.com/containerd/plugin/registry"

	"github.com/kuasar-io/containerd-kuasar/plugins/keeper"
	"github.com/kuasar-io/containerd-kuasar/plugins/metrics"
)

// Type is the plugin type of the monitor.
const Type plugin.Type = "io.containerd.kuasar.monitor.v1"

// ID of the monitor plugin.
const ID = "keeper"

// Config of the monitor plugin.
type Config struct {
	// KeeperPath is the kuasar-keeper binary; empty looks beside the daemon
	// and on PATH.
	KeeperPath string `toml:"keeper_path" comment:"kuasar-keeper binary: a path, or \"\" for the one beside containerd-kuasar, else on PATH"`
	// Socket the keeper serves on; empty is keeper-v<protocol>.sock in
	// the plugin's state directory (a keeper of another protocol version
	// keeps its own socket and children).
	Socket string `toml:"socket" comment:"Socket the keeper serves on; \"\" is keeper-v<protocol>.sock in the plugin's state directory"`
}

func init() {
	registry.Register(&plugin.Registration{
		Type:   Type,
		ID:     ID,
		Config: &Config{},
		InitFn: func(ic *plugin.InitContext) (any, error) {
			cfg := ic.Config.(*Config)
			state := ic.Properties[plugins.PropertyStateDir]
			if err := os.MkdirAll(state, 0o700); err != nil {
				return nil, err
			}
			if _, err := FindKeeper(cfg.KeeperPath); err != nil {
				// Not fatal here: sandboxes report it when they need it,
				// and it is looked for again at each start of the keeper.
				log.G(ic.Context).WithError(err).Warn("kuasar-keeper not found; Kuasar sandboxes that run processes will fail until it is installed")
			}
			sock := cfg.Socket
			if sock == "" {
				sock = filepath.Join(state, fmt.Sprintf("keeper-v%d.sock", keeper.ProtocolVersion))
			}
			m := New(keeper.Launch{
				Socket:  sock,
				LogPath: filepath.Join(state, "keeper.log"),
			})
			m.find = func() (string, error) { return FindKeeper(cfg.KeeperPath) }
			if err := metrics.Register(m.collector()); err != nil {
				log.G(ic.Context).WithError(err).Error("the keeper's metrics are not exported")
			}
			return m, nil
		},
	})
}
