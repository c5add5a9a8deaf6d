// SPDX-License-Identifier: GPL-2.0
/*
 * physr_oracle: the running kernel's own P2PDMA verdicts, for scripts/test-kernel to
 * compare with `physr topo --json` on the same guest.
 *
 * For every (provider, client) pair of PCI functions that are neither bridges nor of a
 * bridge header type (the pairs physr topo lists), it prints one line:
 *
 *   physr-oracle: pair provider=BDF client=BDF p2pmem=0|1 distance=N map=TYPE
 *
 * distance is pci_p2pdma_distance_many(provider, &client, 1, true): -1 when the kernel does
 * not support the pair, else the hop count (calc_map_type_and_dist() is static; this is
 * its exported wrapper). With verbose=true the kernel also explains refusals in dmesg.
 * For a provider that published p2pmem, map is what dma_map_sgtable() of one p2pmem page
 * for the client did (the real path, IOMMU included): bus_addr (the segment is marked as
 * a PCI bus address), thru_host_bridge (mapped as CPU memory), not_supported (-EREMOTEIO),
 * or error(N) for any other failure; "none" for providers without p2pmem.
 * The load ends with "physr-oracle: done pairs=N" and the module stays loaded.
 */
#include <linux/dma-mapping.h>
#include <linux/module.h>
#include <linux/pci-p2pdma.h>
#include <linux/pci.h>
#include <linux/scatterlist.h>

static bool listed(struct pci_dev *d)
{
	return d->hdr_type == PCI_HEADER_TYPE_NORMAL && (d->class >> 16) != PCI_BASE_CLASS_BRIDGE;
}

static const char *map_of(struct pci_dev *provider, struct pci_dev *client, char *buf, size_t n)
{
	struct sg_table sgt = {};
	struct scatterlist *sgl;
	unsigned int nents = 0;
	int ret;

	sgl = pci_p2pmem_alloc_sgl(provider, &nents, PAGE_SIZE);
	if (!sgl)
		return "alloc-failed";
	sgt.sgl = sgl;
	sgt.nents = sgt.orig_nents = nents;
	ret = dma_map_sgtable(&client->dev, &sgt, DMA_BIDIRECTIONAL, 0);
	if (ret == -EREMOTEIO) {
		snprintf(buf, n, "not_supported");
	} else if (ret) {
		snprintf(buf, n, "error(%d)", ret);
	} else {
		snprintf(buf, n, "%s", sg_dma_is_bus_address(sgt.sgl) ? "bus_addr" : "thru_host_bridge");
		dma_unmap_sgtable(&client->dev, &sgt, DMA_BIDIRECTIONAL, 0);
	}
	pci_p2pmem_free_sgl(provider, sgl);
	return buf;
}

static int __init physr_oracle_init(void)
{
	struct pci_dev *provider = NULL, *client;
	unsigned int pairs = 0;

	for_each_pci_dev(provider) {
		bool has = pci_has_p2pmem(provider);

		if (!listed(provider))
			continue;
		client = NULL;
		for_each_pci_dev(client) {
			struct device *dev = &client->dev;
			char buf[32];
			const char *map = "none";
			int dist;

			if (!listed(client))
				continue;
			dist = pci_p2pdma_distance_many(provider, &dev, 1, true);
			if (has)
				map = map_of(provider, client, buf, sizeof(buf));
			pr_info("physr-oracle: pair provider=%s client=%s p2pmem=%d distance=%d map=%s\n",
				pci_name(provider), pci_name(client), has, dist, map);
			pairs++;
		}
	}
	pr_info("physr-oracle: done pairs=%u\n", pairs);
	return 0;
}

static void __exit physr_oracle_exit(void)
{
}

module_init(physr_oracle_init);
module_exit(physr_oracle_exit);
MODULE_LICENSE("GPL");
MODULE_DESCRIPTION("The kernel's PCI P2PDMA verdict for every pair of functions");
