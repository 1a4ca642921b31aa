// Package appkernel is the kuasar-gvisor sandbox kind (controller
// kuasar-appkernel): each pod runs in one gVisor sandbox, an application
// kernel (the sentry) with a gofer per container, and nothing else of ours
// on the node: no shim, no pause image or process, no per-pod or
// per-container management process.
package appkernel
