-- Which orders contain which product, keyed for a page of them (as on
-- PostgreSQL): the product filter walks (product_id, saga_id) backwards
-- and stops after a page. Written with the saga at creation, deleted with
-- it by the pruner.
CREATE TABLE saga_products (
    product_id TEXT NOT NULL,
    saga_id    TEXT NOT NULL,
    PRIMARY KEY (product_id, saga_id)
) WITHOUT ROWID;

INSERT OR IGNORE INTO saga_products (product_id, saga_id)
SELECT json_extract(item.value, '$.product_id'), sagas.saga_id
FROM sagas, json_each(sagas.items) AS item;

-- Kept by triggers, in the statement that writes the saga (the embedded
-- mode has one writer; PostgreSQL writes them in its creation and pruning
-- statements instead).
CREATE TRIGGER saga_products_created AFTER INSERT ON sagas
BEGIN
    INSERT OR IGNORE INTO saga_products (product_id, saga_id)
    SELECT json_extract(item.value, '$.product_id'), NEW.saga_id
    FROM json_each(NEW.items) AS item;
END;

CREATE TRIGGER saga_products_deleted AFTER DELETE ON sagas
BEGIN
    DELETE FROM saga_products
    WHERE saga_id = OLD.saga_id
      AND product_id IN (SELECT json_extract(item.value, '$.product_id')
                         FROM json_each(OLD.items) AS item);
END;
