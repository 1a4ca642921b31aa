package monitor

import (
	gometrics "github.com/docker/go-metrics"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/kuasar-io/containerd-kuasar/plugins/internal/proc"
	"github.com/kuasar-io/containerd-kuasar/plugins/metrics"
)

// collector exports kuasar_keeper_*: gauges read at each scrape, from the
// connection the daemon holds (a scrape never starts or dials a keeper).
func (m *Monitor) collector() prometheus.Collector {
	ns := gometrics.NewNamespace(metrics.Namespace, "keeper", nil)
	up := ns.NewDesc("up", "1 while the daemon is connected to the node's process keeper", "")
	children := ns.NewDesc("children", "Live child processes of the process keeper (workloads and the runtime calls it runs; 0 while not connected)", "")
	watched := ns.NewDesc("watched_processes", "Processes whose exit the daemon waits for through the keeper", "")
	ns.Add(metrics.NewGauges(func(emit func(*prometheus.Desc, float64, ...string)) {
		st := m.Stats()
		n, connected := 0, 0.0
		if st.KeeperPid != 0 {
			n, connected = proc.Children(st.KeeperPid), 1
		}
		emit(up, connected)
		emit(children, float64(n))
		emit(watched, float64(st.Watched))
	}, up, children, watched))
	return ns
}
