package builtins

import (
	"bytes"
	"fmt"
	"strings"

	"github.com/containerd/containerd/v2/plugins"
	"github.com/containerd/plugin"
	"github.com/containerd/plugin/registry"
	"github.com/pelletier/go-toml/v2"
)

// KuasarPrefix starts the ID of every Kuasar sandbox controller and the type
// of every internal Kuasar plugin.
const KuasarPrefix = "kuasar"

// criRuntimePluginURI is the CRI plugin holding runtime handler configuration.
var criRuntimePluginURI = plugins.CRIServicePlugin.String() + ".runtime"

// taskRuntimePluginURI is containerd's task runtime. On start-up it re-dials
// every task endpoint left by the previous daemon, so the in-process task
// servers of the Kuasar controllers must be listening before it initialises.
var taskRuntimePluginURI = plugins.RuntimePluginV2.String() + ".task"

// DefaultHandlers is merged into the CRI runtime plugin's built-in defaults,
// so that a node without a config file (and `config default`) already has the
// Kuasar runtime handlers next to the stock `runc` one.
const DefaultHandlers = `
[containerd.runtimes.kuasar-runc]
runtime_type = "io.containerd.kuasar.v1"
sandboxer = "kuasar-runc"
disable_pause_image_pull = true

[containerd.runtimes.kuasar-vmm]
runtime_type = "io.containerd.kuasar.v1"
sandboxer = "kuasar-vmm"
disable_pause_image_pull = true

[containerd.runtimes.kuasar-wasm]
runtime_type = "io.containerd.kuasar.v1"
sandboxer = "kuasar-wasm"
disable_pause_image_pull = true
pod_annotations = ["wasm.kuasar.io/*"]
container_annotations = ["wasm.kuasar.io/*"]

[containerd.runtimes.kuasar-gvisor]
runtime_type = "io.containerd.kuasar.v1"
sandboxer = "kuasar-appkernel"
disable_pause_image_pull = true
`

// IsKuasar reports whether a registration belongs to containerd-kuasar.
func IsKuasar(r *plugin.Registration) bool {
	if r.Type == plugins.SandboxControllerPlugin {
		return strings.HasPrefix(r.ID, KuasarPrefix)
	}
	return strings.HasPrefix(r.Type.String(), "io.containerd."+KuasarPrefix)
}

// Prepare rewrites the global plugin registry so that (1) Kuasar plugins come
// first in initialisation order, in particular before containerd's task
// runtime, (2) the CRI runtime plugin's defaults carry the Kuasar runtime
// handlers, and (3) CRI lists recovered Kuasar pods with their creation
// time and port-forward VM pods (see withCRIFixes). It must run before the daemon reads the
// registry.
func Prepare() error {
	all := registry.Graph(func(*plugin.Registration) bool { return false })

	ordered := make([]plugin.Registration, 0, len(all))
	var rest []plugin.Registration
	for _, r := range all {
		if IsKuasar(&r) {
			ordered = append(ordered, r)
		} else {
			rest = append(rest, r)
		}
	}
	ordered = append(ordered, rest...)

	for i := range ordered {
		switch ordered[i].URI() {
		case criRuntimePluginURI:
			if err := mergeDefaults(ordered[i].Config, DefaultHandlers); err != nil {
				return fmt.Errorf("adding kuasar runtime handlers to CRI defaults: %w", err)
			}
		case criGRPCPluginURI:
			withCRIFixes(&ordered[i])
		}
	}

	registry.Reset()
	for i := range ordered {
		registry.Register(&ordered[i])
	}
	return nil
}

// mergeDefaults decodes a TOML fragment on top of a plugin's default config.
func mergeDefaults(config any, fragment string) error {
	if config == nil {
		return fmt.Errorf("plugin has no config")
	}
	return toml.NewDecoder(bytes.NewReader([]byte(fragment))).Decode(config)
}

// InitOrder returns the URIs of all registered plugins in the order the
// daemon will initialise them.
func InitOrder() []string {
	var uris []string
	for _, r := range registry.Graph(func(*plugin.Registration) bool { return false }) {
		uris = append(uris, r.URI())
	}
	return uris
}
