-- Which orders contain which product, keyed for a page of them: the product
-- filter of ListOrders and ListSagas walks (product_id, saga_id) backwards
-- from the page's start and stops after a page, however long the product's
-- history. Written with the saga at creation, deleted with it by the pruner.
-- It replaces the GIN index of items, whose bitmap read every order of the
-- product and sorted them all for one page.
CREATE TABLE saga_products (
    product_id TEXT NOT NULL,
    saga_id    TEXT NOT NULL,
    PRIMARY KEY (product_id, saga_id)
);

INSERT INTO saga_products (product_id, saga_id)
SELECT DISTINCT item ->> 'product_id', saga_id
FROM sagas, jsonb_array_elements(items) AS item;

DROP INDEX sagas_by_items;
