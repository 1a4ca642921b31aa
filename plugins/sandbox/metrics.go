package sandbox

import (
	"encoding/json"
	"sort"
	"time"

	"github.com/containerd/containerd/v2/core/sandbox"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/kuasar-io/containerd-kuasar/plugins/metrics"
)

// Option configures a Controller.
type Option func(*Controller)

// WithMetrics has the controller export its sandboxes' states and record
// its starts and recoveries in m (see package metrics). It adds the gauge
// kuasar_sandboxes to m.
func WithMetrics(m *metrics.Controller) Option {
	return func(c *Controller) {
		c.metrics = m
		if m == nil {
			return
		}
		desc := m.Desc("sandboxes", "Sandboxes of the controller, by CRI runtime handler and state (created, ready, notready: stopped or ended, not yet removed)", "", "handler", "state")
		m.Add(metrics.NewGauges(func(emit func(*prometheus.Desc, float64, ...string)) {
			for _, s := range c.stateCounts() {
				emit(desc, float64(s.count), s.handler, s.state)
			}
		}, desc))
	}
}

type stateCount struct {
	handler, state string
	count          int
}

// stateCounts counts the controller's sandboxes by handler and state, with
// a zero for every state of every handler seen, so that a series goes down
// to 0 rather than away. It takes no sandbox's lock: an operation can hold
// one for seconds (a VM boot), and a scrape must not wait for it.
func (c *Controller) stateCounts() []stateCount {
	c.mu.Lock()
	counts := map[[2]string]int{}
	for h := range c.handlers {
		for _, st := range []string{metrics.StateCreated, metrics.StateReady, metrics.StateNotReady} {
			counts[[2]string{h, st}] = 0
		}
	}
	for _, e := range c.sandboxes {
		counts[[2]string{e.handler, e.metricState()}]++
	}
	c.mu.Unlock()
	out := make([]stateCount, 0, len(counts))
	for k, n := range counts {
		out = append(out, stateCount{handler: k[0], state: k[1], count: n})
	}
	sort.Slice(out, func(i, j int) bool {
		if out[i].handler != out[j].handler {
			return out[i].handler < out[j].handler
		}
		return out[i].state < out[j].state
	})
	return out
}

// setState changes the sandbox's state; called with e.mu held. The metrics
// read it without that lock.
func (e *entry) setState(s string) {
	e.state = s
	e.shown.Store(s)
}

// metricState is the state label of the sandbox.
func (e *entry) metricState() string {
	s, _ := e.shown.Load().(string)
	switch s {
	case stateReady:
		return metrics.StateReady
	case stateNotReady:
		return metrics.StateNotReady
	}
	return metrics.StateCreated
}

// newEntry returns the entry of a sandbox of handler, counted in the
// controller's metrics from then on; called with c.mu held.
func (c *Controller) newEntry(handler string) *entry {
	if handler == "" {
		handler = c.id
	}
	c.handlers[handler] = true
	return &entry{exited: make(chan struct{}), handler: handler}
}

// criMetadataKey is the sandbox extension where CRI keeps its metadata of
// the pod (podsandbox.MetadataKey): JSON of CRI's sandbox store Metadata.
const criMetadataKey = "metadata"

// runtimeHandler is the CRI runtime handler info was created with, or ""
// when it was not created by CRI.
func runtimeHandler(info sandbox.Sandbox) string {
	ext, ok := info.Extensions[criMetadataKey]
	if !ok || ext == nil {
		return ""
	}
	// CRI's store writes its metadata versioned: {"Version": "v1",
	// "Metadata": {...}}.
	var md struct {
		Metadata struct{ RuntimeHandler string }
	}
	if err := json.Unmarshal(ext.GetValue(), &md); err != nil {
		return ""
	}
	return md.Metadata.RuntimeHandler
}

// taskMetrics reports the containers of one sandbox to the controller's
// metrics.
type taskMetrics struct {
	m       *metrics.Controller
	handler string
}

func (t taskMetrics) ContainerStarted(d time.Duration) { t.m.ContainerStarted(t.handler, d) }
func (t taskMetrics) ContainerStartFailed()            { t.m.ContainerStartFailed(t.handler) }
func (t taskMetrics) ContainerRecovered(result string) { t.m.ContainerRecovered(t.handler, result) }
